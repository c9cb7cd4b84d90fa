"""``torch.compile`` (inductor) backends of both calling conventions.

One dynamo graph per (call kind, batch size, capture spec): shapes are static (``dynamic=False``),
timesteps are tensors, and a spec is a frozen value, so no graph depends on the step, the prompt,
the timestep or where an image sits in a batch. A grad call's backward is compiled by AOTAutograd
with the forward. Availability is a named predicate (:func:`compiled_unavailable_reason`, the
registry's rule for this backend, checked before a runner is built and by ``gnr-fast doctor``),
never discovered by catching a compile failure.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from typing import Any

import torch

from ..attention.capture import CaptureOutputs, CaptureSpec
from .config import RuntimeConfig
from .decompositions import cache_key_tag, inductor_decompositions
from .modules import CapturingUNet, PlainUNet

logger = logging.getLogger(__name__)

CXX_CANDIDATES = ("g++", "c++", "clang++")


def cpp_compiler() -> str | None:
    """The C++ compiler inductor's CPU code generation would use (``$CXX`` first), or ``None``."""
    names = ((os.environ["CXX"],) if os.environ.get("CXX") else ()) + CXX_CANDIDATES
    return next((path for path in map(shutil.which, names) if path), None)


def inductor_unavailable_reason(device: torch.device | str) -> str | None:
    """Why inductor cannot compile UNet calls on ``device`` here, or ``None`` when it can."""
    device = torch.device(device)
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile; install torch >= 2.1"
    if device.type == "cpu" and cpp_compiler() is None:
        return f"no C++ compiler found ({', '.join(CXX_CANDIDATES)} or $CXX); inductor compiles CPU kernels with one"
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed; inductor generates CUDA kernels with it (pip install triton)"
    if device.type not in ("cpu", "cuda"):
        return f"device {device.type!r} is not supported by the compiled backend (cpu, cuda)"
    return None


def compiled_unavailable_reason(device: torch.device, config: RuntimeConfig) -> str | None:
    """The registry's availability rule of the ``"compiled"`` backend: inductor's
    (:func:`inductor_unavailable_reason`), none with ``compiler="aot_eager"`` (no code generation)."""
    return None if config.compiler == "aot_eager" else inductor_unavailable_reason(device)


def compiled_detail() -> str:
    """What ``gnr-fast doctor`` reports when the backend is available."""
    triton = "" if importlib.util.find_spec("triton") else " (not installed)"
    return f"torch.compile with C++ compiler {cpp_compiler()}; on CUDA it also needs triton{triton}"


class CountingBackend:
    """A dynamo backend that counts the graphs it compiles: inductor with this config's options, or
    (``RuntimeConfig.compiler="aot_eager"``) AOTAutograd tracing without code generation, which
    proves the same graphs (no breaks, no recompiles) in seconds instead of minutes."""

    def __init__(self, config: RuntimeConfig, freezing: bool) -> None:
        from torch._inductor import list_mode_options

        self.compiler = config.compiler
        self.patches: dict[str, Any] = dict(list_mode_options(config.compile_mode))
        self.patches.update(freezing=freezing, cpp_wrapper=config.cpp_wrapper)
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> Any:
        self.graphs += 1
        if self.compiler == "aot_eager":
            return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        logger.info("compiling UNet graph %d (inductor, %s)", self.graphs, self.patches)
        # Inductor's decompositions with our overrides for its bugs, under a cache-key tag naming
        # them so that no graph cached without them is reused (runtime/decompositions.py).
        with torch.compiler.config.patch(cache_key_tag=cache_key_tag()):
            return compile_fx(graph, example_inputs, config_patches=self.patches, decompositions=inductor_decompositions())


def configure_compilation(config: RuntimeConfig) -> None:
    """Process-wide settings compiled backends need: inductor's cache folder (when configured) and
    a dynamo recompile limit that fits one graph per call kind, batch size and spec."""
    if config.cache_dir is not None:
        config.cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(config.cache_dir)
    dynamo_config = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, limit_name, max(getattr(dynamo_config, limit_name), config.recompile_limit))


def compile_options(config: RuntimeConfig) -> dict[str, Any]:
    """``torch.compile`` options of a compiled runner: without :attr:`RuntimeConfig.guard_modules`,
    dynamo keeps no guards on the UNet's modules (the per-call guard check of every parameter and
    module attribute is the largest per-call overhead of a compiled call on CPU). A fresh dict per
    ``torch.compile`` call: it pops ``guard_filter_fn`` from the dict it is given."""
    if config.guard_modules:
        return {}
    return {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}


class CompiledPlainRunner:
    """Plain calls through ``torch.compile(PlainUNet, fullgraph=True)`` with inductor."""

    name = "compiled"

    def __init__(self, unet: torch.nn.Module, config: RuntimeConfig) -> None:
        configure_compilation(config)
        self.backend = CountingBackend(config, freezing=config.freezing)
        self.module = PlainUNet(unet)
        self._fn = torch.compile(self.module, fullgraph=True, dynamic=False, backend=self.backend,
                                 options=compile_options(config))

    @property
    def graphs(self) -> int:
        """Graphs compiled so far."""
        return self.backend.graphs

    def __call__(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, *extras: torch.Tensor
    ) -> torch.Tensor:
        return self._fn(latents, timestep, context, *extras)


class CompiledCapturingRunner:
    """Capturing and grad calls through ``torch.compile(CapturingUNet, fullgraph=True)``.

    No-grad calls and grad calls are two compiled functions: only the no-grad one may freeze
    weights (:attr:`RuntimeConfig.freezing`); the grad one is traced by AOTAutograd, which compiles
    the backward that ``torch.autograd.grad`` takes to the latent.
    """

    name = "compiled"

    def __init__(self, unet: torch.nn.Module, config: RuntimeConfig) -> None:
        configure_compilation(config)
        self.module = CapturingUNet(unet)
        self.no_grad_backend = CountingBackend(config, freezing=config.freezing)
        self.grad_backend = CountingBackend(config, freezing=False)
        self._no_grad = torch.compile(self.module, fullgraph=True, dynamic=False, backend=self.no_grad_backend,
                                      options=compile_options(config))
        self._grad = torch.compile(self.module, fullgraph=True, dynamic=False, backend=self.grad_backend,
                                   options=compile_options(config))

    @property
    def graphs(self) -> int:
        """Graphs compiled so far (no-grad and grad)."""
        return self.no_grad_backend.graphs + self.grad_backend.graphs

    def __call__(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, spec: CaptureSpec,
        *extras: torch.Tensor,
    ) -> tuple[torch.Tensor, CaptureOutputs]:
        fn = self._grad if torch.is_grad_enabled() and latents.requires_grad else self._no_grad
        eps, outputs = fn(latents, timestep, context, spec, *extras)
        return eps, CaptureOutputs(*outputs)
