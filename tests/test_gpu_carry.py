"""benchmarks/gpu_carry.sh, in a clone of this checkout's HEAD: ``prepare`` fetches the pinned wheels the
lent GPU machine lacks and takes the bundled weights out so that the working tree fits the device tool's
64 MiB; ``restore`` brings them back from git; ``unpack`` puts a run's archive into benchmarks/results."""

from __future__ import annotations

import re
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def git(clone: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(clone), *args], capture_output=True, text=True, check=True).stdout


def carry(clone: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "benchmarks/gpu_carry.sh", *args], cwd=clone, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.fixture
def clone(tmp_path) -> Path:
    if not (ROOT / ".git").exists():
        pytest.fail("needs a git checkout of gnr-fast (CI runs on one)")
    path = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(path)], check=True)
    return path


def test_prepare_then_restore(clone):
    prepared = carry(clone, "prepare")
    assert prepared.returncode == 0, prepared.stderr
    pins = dict(re.findall(r'"(diffusers|transformers)==([^"]+)"', (clone / "pyproject.toml").read_text()))
    wheels = sorted(p.name for p in (clone / ".gpu-carry" / "whl").glob("*.whl"))
    assert [w.split("-")[0] for w in wheels] == ["diffusers", "importlib_metadata", "transformers"]
    assert f"diffusers-{pins['diffusers']}-" in wheels[0] and f"transformers-{pins['transformers']}-" in wheels[2]
    removed = [line[3:] for line in git(clone, "status", "--porcelain").splitlines()]
    assert removed and all(re.fullmatch(r"gnr_fast/models/shapes-v1/.+\.(safetensors|pt)", p) for p in removed)
    travelling = int(re.search(r"will travel: (\d+) MiB of the device tool's 64", prepared.stdout).group(1))
    assert 0 < travelling <= 64
    assert "carry=['.gpu-carry']" in prepared.stdout and "--wheels .gpu-carry/whl" in prepared.stdout

    restored = carry(clone, "restore")
    assert restored.returncode == 0, restored.stderr
    assert git(clone, "status", "--porcelain") == ""  # .gpu-carry/ is ignored through .git/info/exclude


def test_prepare_refuses_changed_weights(clone):
    weights = clone / "gnr_fast" / "models" / "shapes-v1" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    result = carry(clone, "prepare")
    assert result.returncode == 1 and "uncommitted changes" in result.stderr
    assert weights.is_file()


def test_unpack_and_usage(clone, tmp_path):
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "gpu_check.md").write_text("# GPU check\n")
    with tarfile.open(tmp_path / "gpu.tgz", "w:gz") as archive:
        archive.add(tmp_path / "gpu", arcname="gpu")
    result = carry(clone, "unpack", str(tmp_path / "gpu.tgz"))
    assert result.returncode == 0, result.stderr
    assert (clone / "benchmarks" / "results" / "gpu" / "gpu_check.md").read_text() == "# GPU check\n"
    usage = carry(clone)
    assert usage.returncode == 2 and all(word in usage.stdout for word in ("prepare", "restore", "unpack"))
