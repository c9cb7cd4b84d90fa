"""export/kubernetes/gnr-fast.yaml validated offline against the published Kubernetes JSON schemas
(kubernetes-validate ships them; strict: unknown fields are errors), and what it must configure."""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from gnr_fast.serving.balancer import BalancerConfig, nginx_config

MANIFEST = Path(__file__).resolve().parents[2] / "export" / "kubernetes" / "gnr-fast.yaml"
KUBERNETES_VERSION = "1.33.0"  # a release every supported cluster (1.33-1.35 at the time of writing) accepts
REPLICA_HOSTS = [f"gnr-fast-{i}.gnr-fast-replicas.default.svc.cluster.local" for i in range(3)]


@pytest.fixture(scope="module")
def documents() -> dict[str, dict]:
    docs = [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]
    return {f"{doc['kind']}/{doc['metadata']['name']}": doc for doc in docs}


def test_every_document_is_valid_against_the_kubernetes_schemas(documents):
    assert len(documents) == 7
    for name, doc in documents.items():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises ValidationError naming the field


def test_the_validation_catches_a_mistyped_field(documents):
    broken = copy.deepcopy(documents["StatefulSet/gnr-fast"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = broken["spec"]["template"]["spec"][
        "containers"][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_replicas_probe_the_model_hold_one_gpu_and_share_the_compile_cache(documents):
    replicas = documents["StatefulSet/gnr-fast"]["spec"]
    pod = replicas["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/gnr_edit/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/models/gnr_edit/ready"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 == container["resources"]["requests"]["nvidia.com/gpu"]
    env = {item["name"]: item["value"] for item in container["env"]}
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(mounts["compile-cache"] + "/")
    claims = {volume["name"]: volume["persistentVolumeClaim"]["claimName"] for volume in pod["volumes"]}
    assert claims["compile-cache"] in {name.split("/")[1] for name in documents if name.startswith("PersistentVolumeClaim/")}
    assert replicas["serviceName"] == "gnr-fast-replicas" and replicas["replicas"] == len(REPLICA_HOSTS)
    args = dict(arg.lstrip("-").split("=", 1) for arg in container["args"])
    assert pod["terminationGracePeriodSeconds"] > int(args["exit-timeout"])  # SIGTERM's drain fits


def test_balancer_config_map_is_the_rendered_affine_config(documents):
    expected = nginx_config(BalancerConfig(
        http_upstreams=tuple(f"{host}:8000" for host in REPLICA_HOSTS),
        grpc_upstreams=tuple(f"{host}:8001" for host in REPLICA_HOSTS),
        listen_host="0.0.0.0", resolve=True,
    ))
    assert documents["ConfigMap/gnr-fast-balancer"]["data"]["nginx.conf"] == expected
    balancer = documents["Deployment/gnr-fast-balancer"]["spec"]["template"]["spec"]
    mount = balancer["containers"][0]["volumeMounts"][0]["mountPath"]
    assert balancer["containers"][0]["command"] == ["nginx", "-c", f"{mount}/nginx.conf"]
    front = documents["Service/gnr-fast"]["spec"]
    assert front["selector"] == documents["Deployment/gnr-fast-balancer"]["spec"]["selector"]["matchLabels"]
