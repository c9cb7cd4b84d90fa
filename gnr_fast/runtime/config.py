"""How UNet calls execute: :class:`RuntimeConfig` (frozen, validated) and its named presets."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

import torch

from ..errors import ConfigError
from .calls import CallKind
from .registry import backend_names, backend_spec

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class RuntimeConfig:
    """The backends of an editor's UNet calls and their compile options.

    Attributes:
        plain: backend of plain calls (no grad, no captures: inversion, ε_u / ε_trg, unguided
            steps), a name in :mod:`gnr_fast.runtime.registry` serving plain calls (``"eager"``,
            ``"compiled"``, ``"onnx"``, ``"tensorrt"``, or one registered later). An unknown name
            raises :class:`~gnr_fast.errors.BackendUnavailableError` here; one that cannot run on
            the model's device raises it when the editor builds its runners.
        capturing: backend of capturing calls (the source pass, no grad) and grad calls (the
            current-latent pass the energies differentiate); a registered name serving them
            (``"eager"`` or ``"compiled"``).
            When it differs from ``plain``, the source row runs in a call of its own instead of
            sharing the no-grad call with the plain rows.
        compile_mode: ``torch.compile`` mode for compiled backends.
        freezing: inductor's ``freezing`` (weights folded as constants) for no-grad compiled
            calls; grad calls never freeze.
        cpp_wrapper: inductor's C++ wrapper instead of the Python one (CPU/CUDA).
        guard_modules: whether dynamo re-checks the UNet's modules (their attributes, hooks,
            parameters' identity and metadata) before every compiled call. ``False`` (the default)
            keeps only the guards on the call's own inputs (latent/context shapes, the capture
            spec, grad mode), which is what tells an edit's graphs apart; it saves ≈ 1.6 ms per call
            on the bundled model (benchmarks/README.md) and assumes the UNet is not modified
            (cast, hooked, swapped processors or parameters) after the editor is built — in-place
            weight updates are still seen, since weights are graph inputs.
        cache_dir: inductor's on-disk cache folder (``TORCHINDUCTOR_CACHE_DIR``; one per
            process, set when the first compiled backend is built); ``None`` keeps inductor's default,
            which already persists across processes.
        recompile_limit: dynamo's per-function graph limit while compiled backends run (one graph
            per call kind, batch size and capture spec; an edit needs a handful).
        plain_dtype: dtype of plain calls when it differs from the model's (``torch.bfloat16`` on
            CPUs with AVX-512 BF16, ``torch.float16`` on CUDA): eager/compiled plain calls run under
            autocast, the ``onnx`` backend exports a graph in that dtype. ``None`` (the default):
            the model dtype. ``"auto"``: bfloat16 where
            :func:`~gnr_fast.precision.bf16_plain_calls_pay_off` (a float32 SD-size UNet on
            a CPU with native bfloat16: 1.23–1.53x faster plain calls on SD 1.5's architecture,
            benchmarks/README.md), else the model dtype. Not the default: its edit quality was not
            measured, and ONNX Runtime in float32 was faster still.
            Capturing and grad calls keep the model dtype (see docs/precision.md); a low plain
            dtype gives the source row a call of its own (``split_source``).
        onnx_exports: folders written by ``gnr-fast export onnx`` for the ``onnx`` backend; working
            sizes they lack are exported lazily into ``export_cache_dir``.
        onnx_provider: ONNX Runtime execution provider (``"auto"``: TensorRT, then CUDA, then CPU,
            as offered).
        export_cache_dir: where lazy ONNX exports go (``None``: ``$GNR_FAST_CACHE/onnx``).
        tensorrt_engine: the engine file of ``gnr-fast export tensorrt`` for the ``tensorrt`` backend.
    """

    plain: str = "eager"
    capturing: str = "eager"
    compile_mode: CompileMode = "default"
    freezing: bool = False
    cpp_wrapper: bool = False
    guard_modules: bool = False
    cache_dir: Path | None = None
    recompile_limit: int = 64
    compiler: Literal["inductor", "aot_eager"] = "inductor"
    plain_dtype: torch.dtype | Literal["auto"] | None = None
    onnx_exports: tuple[Path, ...] = ()
    onnx_provider: str = "auto"
    export_cache_dir: Path | None = None
    tensorrt_engine: Path | None = None

    def __post_init__(self) -> None:
        for name, kind in (("plain", CallKind.PLAIN), ("capturing", CallKind.CAPTURING)):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"RuntimeConfig.{name} must be a backend name such as 'eager', got {value!r}")
            unknown = set(backend_spec(value, kind).options) - {field.name for field in fields(self)}
            if unknown:
                raise ConfigError(f"backend {value!r} reads RuntimeConfig fields that do not exist: {sorted(unknown)}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"RuntimeConfig.compile_mode must be one of {list(COMPILE_MODES)}, got {self.compile_mode!r}")
        for name in ("freezing", "cpp_wrapper", "guard_modules"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"RuntimeConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        if self.compiler not in ("inductor", "aot_eager"):
            raise ConfigError(f"RuntimeConfig.compiler must be 'inductor' or 'aot_eager', got {self.compiler!r}")
        if not (self.plain_dtype == "auto" or self.plain_dtype in (None, torch.float32, torch.float16, torch.bfloat16)):
            raise ConfigError(f"RuntimeConfig.plain_dtype must be 'auto', None, torch.float32, torch.float16 or "
                              f"torch.bfloat16, got {self.plain_dtype!r}")
        if isinstance(self.onnx_exports, (str, Path)) or not all(isinstance(p, (str, Path)) for p in self.onnx_exports):
            raise ConfigError(f"RuntimeConfig.onnx_exports must be a tuple of folders, got {self.onnx_exports!r}")
        object.__setattr__(self, "onnx_exports", tuple(Path(p) for p in self.onnx_exports))
        if self.onnx_provider not in ("auto", "cpu", "cuda", "tensorrt"):
            raise ConfigError(f"RuntimeConfig.onnx_provider must be 'auto', 'cpu', 'cuda' or 'tensorrt', got {self.onnx_provider!r}")
        for name in ("export_cache_dir", "tensorrt_engine"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        limit = self.recompile_limit
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"RuntimeConfig.recompile_limit must be a positive integer, got {limit!r}")

    @property
    def split_source(self) -> bool:
        """Whether the source row needs a call of its own: plain and capturing backends differ, or
        plain calls run in a dtype of their own (``"auto"`` is decided per model by the executor)."""
        return self.plain != self.capturing or self.plain_dtype not in (None, torch.float32, "auto")

    @classmethod
    def preset(cls, name: str) -> RuntimeConfig:
        """The preset of backend ``name`` (:func:`runtime_names`): every call on it, or, for a
        backend serving plain calls only (``"onnx"``, ``"tensorrt"``), plain calls on it and
        capturing/grad calls eager. Raises :class:`~gnr_fast.errors.BackendUnavailableError` for an
        unknown name."""
        backend_spec(name)  # an unknown name: "runtime ... is unknown"
        spec = backend_spec(name, CallKind.PLAIN)  # a preset runs its backend's plain calls
        return cls(name, name if spec.serves(CallKind.CAPTURING) else "eager")

    @classmethod
    def resolve(cls, runtime: RuntimeConfig | str | None) -> RuntimeConfig:
        """``runtime`` as a config: a preset name, a config, or ``None`` for the eager preset."""
        if runtime is None:
            return cls()
        if isinstance(runtime, RuntimeConfig):
            return runtime
        if isinstance(runtime, str):
            return cls.preset(runtime)
        raise ConfigError(f"runtime must be a preset name {list(runtime_names())} or a RuntimeConfig, got {type(runtime).__name__}")

    def with_cache_dir(self, cache_dir: str | Path | None) -> RuntimeConfig:
        return replace(self, cache_dir=cache_dir)


def runtime_names() -> tuple[str, ...]:
    """The preset names (``RuntimeConfig.preset``, ``--runtime``): every registered backend serving
    plain calls, read when called (a backend registered later is included)."""
    return backend_names(CallKind.PLAIN)
