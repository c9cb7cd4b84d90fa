"""How UNet calls execute: :class:`RuntimeConfig` (frozen, validated) and its named presets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch

from ..errors import ConfigError
from .calls import CallKind
from .registry import BACKENDS, backend_names, backend_option, backend_spec, option_owner

OptionValues = tuple[tuple[str, str, Any], ...]
"""A config's backend options as given: ``(backend, option, value)`` sorted, defaults left out."""


@dataclass(frozen=True, init=False)
class RuntimeConfig:
    """The backends of an editor's UNet calls, the dtype of its plain calls and the backends' options.

    ``RuntimeConfig(plain, capturing, plain_dtype=None, **options)``: every other keyword is an
    option some registered backend declares (its :class:`~gnr_fast.runtime.registry.BackendSpec`'s
    ``options``, listed by ``gnr-fast doctor``), checked by that option's own check whichever
    backends are chosen; a keyword no registered backend declares raises
    :class:`~gnr_fast.errors.ConfigError`. An option reads back as an attribute
    (``config.compile_mode``) or by :meth:`option`; ``dataclasses.replace(config, name=value)``
    takes the same keywords. The bundled backends' options:

    - ``compiled``: ``compile_mode`` (``torch.compile`` mode), ``freezing`` (inductor's weights
      folded as constants, no-grad calls only), ``cpp_wrapper`` (inductor's C++ wrapper),
      ``guard_modules`` (whether dynamo re-checks the UNet's modules — attributes, hooks,
      parameters' identity and metadata — before every call; ``False``, the default, keeps only
      the guards on the call's own inputs, which is what tells an edit's graphs apart; it saves
      ≈ 1.6 ms per call on the bundled model (benchmarks/README.md) and assumes the UNet is not
      modified (cast, hooked, swapped processors or parameters) after the editor is built —
      in-place weight updates are still seen, since weights are graph inputs), ``cache_dir``
      (inductor's on-disk cache, ``TORCHINDUCTOR_CACHE_DIR``, one per process, set when the first
      compiled backend is built; ``None`` keeps inductor's default, which already persists across
      processes), ``recompile_limit`` (dynamo's per-function graph limit while compiled backends
      run: one graph per call kind, batch size and capture spec; an edit needs a handful),
      ``compiler`` (``"inductor"`` or ``"aot_eager"``).
    - ``onnx``: ``onnx_exports`` (folders written by ``gnr-fast export onnx``; working sizes they
      lack are exported lazily into ``export_cache_dir``), ``onnx_provider`` (``"auto"``:
      TensorRT, then CUDA, then CPU, as offered), ``export_cache_dir`` (``None``:
      ``$GNR_FAST_CACHE/onnx``).
    - ``tensorrt``: ``tensorrt_engine`` (the engine file of ``gnr-fast export tensorrt``).

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
        options: the backend options given, ``(backend, option, value)`` sorted, those equal to
            their default left out (so configs differing in defaults only compare equal);
            read them with :meth:`option` / :meth:`backend_options` or as attributes.
    """

    plain: str = "eager"
    capturing: str = "eager"
    plain_dtype: torch.dtype | Literal["auto"] | None = None
    options: OptionValues = ()

    def __init__(
        self,
        plain: str = "eager",
        capturing: str = "eager",
        plain_dtype: torch.dtype | Literal["auto"] | None = None,
        options: OptionValues | Mapping[str, Mapping[str, Any]] = (),
        **backend_options: Any,
    ) -> None:
        for name, kind, value in (("plain", CallKind.PLAIN, plain), ("capturing", CallKind.CAPTURING, capturing)):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"RuntimeConfig.{name} must be a backend name such as 'eager', got {value!r}")
            backend_spec(value, kind)
            object.__setattr__(self, name, value)
        given: dict[tuple[str, str], Any] = {}
        if isinstance(options, Mapping):
            given.update(((backend, name), value) for backend, values in options.items() for name, value in values.items())
        else:
            given.update(((backend, name), value) for backend, name, value in options)
        for name, value in backend_options.items():
            owner = option_owner(name)
            if owner is None:
                declared = sorted(o.name for spec in BACKENDS.values() for o in spec.options)
                raise ConfigError(f"RuntimeConfig has no option {name!r}: no registered backend declares it "
                                  f"(their options: {declared})")
            given[owner.name, name] = value
        kept = []
        for (backend, name), value in sorted(given.items(), key=lambda item: item[0]):
            option = backend_option(backend, name)
            value = option.checked(value)
            if value != option.default:
                kept.append((backend, name, value))
        object.__setattr__(self, "options", tuple(kept))
        if not (plain_dtype == "auto" or plain_dtype in (None, torch.float32, torch.float16, torch.bfloat16)):
            raise ConfigError(f"RuntimeConfig.plain_dtype must be 'auto', None, torch.float32, torch.float16 or "
                              f"torch.bfloat16, got {plain_dtype!r}")
        object.__setattr__(self, "plain_dtype", plain_dtype)

    def option(self, backend: str, name: str) -> Any:
        """Option ``name`` of backend ``backend``: the value given, else its default; raises
        :class:`~gnr_fast.errors.ConfigError` when the backend declares no such option."""
        option = backend_option(backend, name)
        return next((value for b, n, value in self.options if (b, n) == (backend, name)), option.default)

    def backend_options(self, backend: str) -> Mapping[str, Any]:
        """Every option of ``backend`` with its value here (read-only)."""
        return MappingProxyType({o.name: self.option(backend, o.name) for o in backend_spec(backend).options})

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: a backend option read as an attribute.
        if name.startswith("_") or name == "options":
            raise AttributeError(name)
        owner = option_owner(name)
        if owner is None:
            raise AttributeError(f"'RuntimeConfig' object has no attribute {name!r}")
        return self.option(owner.name, name)

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
