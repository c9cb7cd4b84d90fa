"""The one list of runtime backends: what each is called, which calls it serves, how it is built,
why it cannot run here, and the options it reads from a
:class:`~gnr_fast.runtime.config.RuntimeConfig` (:class:`~gnr_fast.runtime.options.BackendOption`).

Everything that names backends reads this registry: ``RuntimeConfig`` validation and presets, the
executor building its runners (:mod:`gnr_fast.runtime.backends`), the CLI's ``--runtime`` choices,
the Triton repository export and ``gnr-fast doctor``. A backend is one module holding its runner
(and its availability predicate); its :class:`BackendSpec` here names them by ``"module:attribute"``
so that nothing is imported before a backend is used (TensorRT and ONNX Runtime stay lazy, and
the registry sits below every backend module in the import graph). Adding one::

    register_backend(BackendSpec("mine", "what it is", plain="my_pkg.backend:MyPlainRunner",
                                 options=(BackendOption("my_knob", 1, "what it sets", positive_int),)))

(``RuntimeConfig(plain="mine", my_knob=2)`` then takes it, and the runner reads ``config.my_knob``)

(a factory may also be given as the callable itself).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import BackendUnavailableError, ConfigError
from .calls import CallKind
from .options import BackendOption, flag, one_of, optional_path, paths, positive_int

Factory = Callable[[torch.nn.Module, Any], Any]
"""``(unet, RuntimeConfig) -> runner`` of one calling convention (see :mod:`gnr_fast.runtime.backends`)."""
Reason = Callable[[torch.device, Any], "str | None"]
"""``(device, RuntimeConfig) -> why the backend cannot run there, or None``."""


def always_available(device: torch.device, config: Any) -> str | None:
    """The availability predicate of a backend that runs wherever torch runs."""
    return None


@dataclass(frozen=True)
class BackendSpec:
    """One runtime backend.

    Attributes:
        name: what ``RuntimeConfig.plain`` / ``.capturing``, presets and ``--runtime`` call it.
        summary: one line for the CLI help and ``gnr-fast doctor``.
        plain: factory of its plain runner (``(unet, config) -> runner``), a callable or
            ``"module:attribute"``; ``None`` when it serves no plain calls.
        capturing: factory of its capturing runner (capturing and grad calls), or ``None``.
        unavailable_reason: ``(device, config) -> str | None``, the one rule saying why it cannot
            run on ``device`` with ``config`` (checked before a runner is built, and by ``doctor``).
        detail: ``() -> str`` naming what was found (versions) when available, for ``doctor``.
        options: the options it reads from a ``RuntimeConfig`` (:class:`BackendOption`), each a
            keyword of ``RuntimeConfig(...)`` and an attribute of the config; names are unique
            across the registered backends.
        export: the ``gnr-fast export`` command writing the artifact it runs (``None``: it runs the
            PyTorch UNet). An exported backend runs its artifact's dtype: plain calls are not
            autocast, ``plain_dtype`` picks the export's dtype instead.
    """

    name: str
    summary: str
    plain: Factory | str | None = None
    capturing: Factory | str | None = None
    unavailable_reason: Reason | str = always_available
    detail: Callable[[], str] | str | None = None
    options: tuple[BackendOption, ...] = ()
    export: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a backend needs a non-empty name, got {self.name!r}")
        if self.plain is None and self.capturing is None:
            raise ConfigError(f"backend {self.name!r} serves no calls: give a plain or a capturing factory")
        names = [option.name for option in self.options]
        if not all(isinstance(option, BackendOption) for option in self.options) or len(set(names)) < len(names):
            raise ConfigError(f"backend {self.name!r}: options must be BackendOptions with distinct names, got {self.options!r}")

    @property
    def kinds(self) -> frozenset[CallKind]:
        """The call kinds it serves (a capturing backend serves grad calls too)."""
        kinds = {CallKind.PLAIN} if self.plain is not None else set()
        if self.capturing is not None:
            kinds |= {CallKind.CAPTURING, CallKind.GRAD}
        return frozenset(kinds)

    def serves(self, kind: CallKind) -> bool:
        return kind in self.kinds

    def factory(self, kind: CallKind) -> Factory:
        """The runner factory of ``kind`` (imported now when named by a string)."""
        ref = self.plain if kind is CallKind.PLAIN else self.capturing
        if ref is None:
            raise BackendUnavailableError(self.refusal(kind))
        return _resolve(ref)

    def why_unavailable(self, device: torch.device | str, config: Any) -> str | None:
        """:attr:`unavailable_reason` for ``device`` and ``config``."""
        return _resolve(self.unavailable_reason)(torch.device(device), config)

    def describe(self) -> str:
        """What ``doctor`` prints when the backend is available (its options' defaults after it)."""
        found = _resolve(self.detail)() if self.detail is not None else self.summary
        return f"{found}; options: {self.options_with_defaults()}" if self.options else found

    def options_with_defaults(self) -> str:
        """``name=default, ...`` of its options (``doctor``)."""
        return ", ".join(f"{o.name}={o.default!r}" for o in self.options)

    def help_line(self) -> str:
        """``name: summary (RuntimeConfig options: name: help; ...)`` for the CLI's ``--runtime`` help."""
        options = "; ".join(f"{o.name}: {o.help}" for o in self.options)
        return f"{self.name}: {self.summary}" + (f" (RuntimeConfig options: {options})" if options else "")

    def refusal(self, kind: CallKind) -> str:
        served = ", ".join(sorted(k.value for k in self.kinds))
        return f"{kind.value} backend {self.name!r} is not offered: {self.name!r} serves {served} calls only"


def _resolve(ref: Any) -> Any:
    """A callable given as itself or as ``"module:attribute"`` (imported on first use)."""
    if not isinstance(ref, str):
        return ref
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec(
            "eager", "eager PyTorch",
            plain="gnr_fast.runtime.eager:EagerPlainRunner",
            capturing="gnr_fast.runtime.eager:EagerCapturingRunner",
            detail="gnr_fast.runtime.eager:eager_detail",
        ),
        BackendSpec(
            "compiled", "torch.compile with inductor (compiles on first use)",
            plain="gnr_fast.runtime.compiled:CompiledPlainRunner",
            capturing="gnr_fast.runtime.compiled:CompiledCapturingRunner",
            unavailable_reason="gnr_fast.runtime.compiled:compiled_unavailable_reason",
            detail="gnr_fast.runtime.compiled:compiled_detail",
            options=(
                BackendOption("compile_mode", "default", "torch.compile mode",
                              one_of("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs",
                                     as_list=True)),
                BackendOption("freezing", False, "inductor's freezing (weights folded as constants) in no-grad "
                              "calls", flag),
                BackendOption("cpp_wrapper", False, "inductor's C++ wrapper instead of the Python one", flag),
                BackendOption("guard_modules", False, "dynamo re-checks the UNet's modules before every call "
                              "(off: only the call's own inputs are guarded)", flag),
                BackendOption("cache_dir", None, "inductor's on-disk cache folder (TORCHINDUCTOR_CACHE_DIR, "
                              "None: inductor's default)", optional_path),
                BackendOption("recompile_limit", 64, "dynamo's per-function graph limit", positive_int),
                BackendOption("compiler", "inductor", "torch.compile backend", one_of("inductor", "aot_eager")),
            ),
        ),
        BackendSpec(
            "onnx", "plain calls on ONNX Runtime (capturing and grad calls eager)",
            plain="gnr_fast.runtime.onnx.runner:onnx_plain_runner",
            unavailable_reason="gnr_fast.runtime.onnx.runner:onnx_unavailable_reason",
            detail="gnr_fast.runtime.onnx.runner:onnx_detail",
            options=(
                BackendOption("onnx_exports", (), "folders written by `gnr-fast export onnx` (missing working "
                              "sizes are exported lazily)", paths),
                BackendOption("onnx_provider", "auto", "ONNX Runtime execution provider (auto: TensorRT, then "
                              "CUDA, then CPU)", one_of("auto", "cpu", "cuda", "tensorrt")),
                BackendOption("export_cache_dir", None, "where lazy exports go (None: $GNR_FAST_CACHE/onnx)",
                              optional_path),
            ),
            export="onnx",
        ),
        BackendSpec(
            "tensorrt", "plain calls on a TensorRT engine (capturing and grad calls eager; NVIDIA GPUs)",
            plain="gnr_fast.runtime.tensorrt.runner:tensorrt_plain_runner",
            unavailable_reason="gnr_fast.runtime.tensorrt.engine:tensorrt_unavailable_reason",
            detail="gnr_fast.runtime.tensorrt.engine:tensorrt_detail",
            options=(BackendOption("tensorrt_engine", None, "the engine file of `gnr-fast export tensorrt`",
                                   optional_path),),
            export="tensorrt",
        ),
    )
}
"""Every backend by name, in the order the CLI and ``doctor`` list them."""


def register_backend(spec: BackendSpec) -> BackendSpec:
    """Add ``spec`` to :data:`BACKENDS` (refusing a name, or an option name, already taken) and return it."""
    if spec.name in BACKENDS:
        raise ConfigError(f"a backend named {spec.name!r} is already registered")
    for option in spec.options:
        owner = option_owner(option.name)
        if owner is not None:
            raise ConfigError(f"backend {spec.name!r}: option {option.name!r} is already backend {owner.name!r}'s")
    BACKENDS[spec.name] = spec
    return spec


def backend_names(kind: CallKind | None = None) -> tuple[str, ...]:
    """Registered backend names, those serving ``kind`` only when given."""
    return tuple(name for name, spec in BACKENDS.items() if kind is None or spec.serves(kind))


def backend_spec(name: str, kind: CallKind | None = None) -> BackendSpec:
    """The spec of ``name``; raises :class:`BackendUnavailableError` for an unknown name, or one
    that does not serve ``kind`` when given."""
    spec = BACKENDS.get(name) if isinstance(name, str) else None
    if spec is None:
        what = f"{kind.value} backend" if kind is not None else "runtime"
        names = list(backend_names(kind))
        raise BackendUnavailableError(f"{what} {name!r} is unknown; choose one of {names} or pass a RuntimeConfig")
    if kind is not None and not spec.serves(kind):
        raise BackendUnavailableError(spec.refusal(kind))
    return spec


def option_owner(name: str) -> BackendSpec | None:
    """The registered backend declaring option ``name``, or ``None``."""
    return next((spec for spec in BACKENDS.values() if any(o.name == name for o in spec.options)), None)


def backend_option(backend: str, name: str) -> BackendOption:
    """Option ``name`` of registered backend ``backend``; :class:`ConfigError` when it declares none."""
    option = next((o for o in backend_spec(backend).options if o.name == name), None)
    if option is None:
        declared = [o.name for o in backend_spec(backend).options]
        raise ConfigError(f"backend {backend!r} has no option {name!r}; its options: {declared}")
    return option
