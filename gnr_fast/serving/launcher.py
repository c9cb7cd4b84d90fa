"""Starting Triton from this interpreter: the availability check and the process environment.

The Python-backend stub bundled with pytriton is a separate executable that links
``libpython3.X.so``. The dynamic loader finds the *system* library first (e.g. Debian's 3.11.2)
even when a pyenv interpreter (3.11.7) runs the server, and the stub then runs the interpreter's
standard library on a mismatched ``libpython``: model load fails with
``'_thread.RLock' object has no attribute '_recursion_count'``. Putting the running
interpreter's ``LIBDIR`` first on ``LD_LIBRARY_PATH`` of the processes Triton starts fixes it;
:func:`triton_environment` builds that environment, :func:`prepare_environment` applies it to
this process before Triton is started (Triton's children inherit it; no re-exec is needed since
only the stub, a child, loads ``libpython``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Mapping

from ..errors import BackendUnavailableError

logger = logging.getLogger(__name__)

SERVE_EXTRA = (
    'pip install "gnr-fast[serve]"  (nvidia-pytriton==0.7.0, tritonclient[http,grpc]==2.73.0, prometheus_client==0.26.0)'
)


def installed(module: str) -> bool:
    """Whether ``module`` can be imported here (without importing it)."""
    return importlib.util.find_spec(module) is not None


def require_pytriton() -> None:
    """Raise :class:`BackendUnavailableError` naming the install command unless the server's
    packages (pytriton, tritonclient, prometheus_client for the service metrics) can be imported."""
    missing = [name for name in ("pytriton", "tritonclient", "prometheus_client") if not installed(name)]
    if missing:
        raise BackendUnavailableError(f"serving needs {', '.join(missing)}; install them with {SERVE_EXTRA}")


def require_tritonclient() -> None:
    """Raise :class:`BackendUnavailableError` naming the install command unless tritonclient can be imported."""
    if not installed("tritonclient"):
        raise BackendUnavailableError(f"the client needs tritonclient; install it with {SERVE_EXTRA}")


def interpreter_libdir() -> Path | None:
    """The directory holding this interpreter's shared ``libpython`` (None for a static build)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    library = sysconfig.get_config_var("LDLIBRARY")
    if not libdir or not library or not (Path(libdir) / library).exists():
        return None
    return Path(libdir)


def triton_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with this interpreter's libpython first on
    ``LD_LIBRARY_PATH`` and its ``bin`` first on ``PATH`` (where the stub looks for the Python
    environment whose packages it imports)."""
    env = dict(os.environ if base is None else base)
    libdir = interpreter_libdir()
    if libdir is not None:
        parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p and p != str(libdir)]
        env["LD_LIBRARY_PATH"] = ":".join([str(libdir), *parts])
    bindir = str(Path(sys.executable).parent)
    paths = [p for p in env.get("PATH", "").split(":") if p and p != bindir]
    env["PATH"] = ":".join([bindir, *paths])
    return env


def prepare_environment() -> None:
    """Apply :func:`triton_environment` to this process (call before starting Triton)."""
    env = triton_environment()
    for name in ("LD_LIBRARY_PATH", "PATH"):
        if os.environ.get(name) != env[name]:
            logger.info("setting %s=%s for the Triton Python-backend stub", name, env[name])
            os.environ[name] = env[name]


def pytriton_root() -> Path:
    """The installed ``pytriton`` package directory (holding the bundled ``tritonserver``)."""
    require_pytriton()
    spec = importlib.util.find_spec("pytriton")
    return Path(spec.origin).parent


def tritonserver_binary() -> Path:
    """The ``tritonserver`` executable bundled in the pytriton wheel."""
    return pytriton_root() / "tritonserver" / "bin" / "tritonserver"


def tritonserver_libs() -> Path:
    """The shared libraries the bundled ``tritonserver`` links (``nvidia_pytriton.libs``)."""
    root = pytriton_root()
    for candidate in (root.parent / "nvidia_pytriton.libs", root / "tritonserver" / "external_libs"):
        if candidate.is_dir():
            return candidate
    raise BackendUnavailableError(f"the libraries of pytriton's bundled tritonserver are missing under {root.parent}")


def backend_directory(workdir: Path) -> Path:
    """A Triton backend directory under ``workdir`` whose ``python`` backend has the stub of this Python version."""
    source = pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise BackendUnavailableError(f"pytriton ships no Python-backend stub for Python {version} (looked for {stub})")
    backends = Path(workdir) / "backends"
    if backends.exists():
        shutil.rmtree(backends)
    shutil.copytree(source / "backends", backends)
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    return backends


def tritonserver_command(
    repository: Path,
    workdir: Path,
    host: str = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    exit_timeout_s: int = 30,
) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that run the bundled ``tritonserver`` on a model ``repository``, all
    endpoints bound to ``host``."""
    backends = backend_directory(workdir)
    argv = [
        str(tritonserver_binary()),
        f"--model-repository={repository}",
        f"--backend-directory={backends}",
        f"--cache-directory={pytriton_root() / 'tritonserver' / 'caches'}",
        f"--http-address={host}",
        f"--http-port={http_port}",
        f"--grpc-address={host}",
        f"--grpc-port={grpc_port}",
        f"--metrics-address={host}",
        f"--metrics-port={metrics_port}",
        "--allow-gpu-metrics=false",
        f"--exit-timeout-secs={exit_timeout_s}",
        "--strict-readiness=true",
    ]
    env = triton_environment()
    env["LD_LIBRARY_PATH"] = f"{env['LD_LIBRARY_PATH']}:{tritonserver_libs()}".strip(":")
    return argv, env
