"""gnr-fast: fast, faithful Guide-and-Rescale real-image editing for Stable Diffusion 1.x/2.x."""

from .config import (
    CfgGuider,
    EditConfig,
    FeaturesMapL2,
    LatentsDiff,
    RescaleConfig,
    SelfAttnMapL2,
    SelfAttnMapL2Appearance,
)
from .editor import Editor
from .results import EditResult, Timings
from .errors import (
    BackendUnavailableError,
    ConfigError,
    ExportError,
    GnrError,
    GuidanceError,
    InputError,
    InversionMismatchError,
    ModelLoadError,
)
from .inversion import Inversion
from .version import __version__

__all__ = [
    "BackendUnavailableError",
    "CfgGuider",
    "ConfigError",
    "EditConfig",
    "EditResult",
    "Editor",
    "ExportError",
    "FeaturesMapL2",
    "GnrError",
    "GuidanceError",
    "GuideAndRescalePipeline",
    "InputError",
    "Inversion",
    "InversionMismatchError",
    "LatentsDiff",
    "ModelLoadError",
    "RescaleConfig",
    "SelfAttnMapL2",
    "SelfAttnMapL2Appearance",
    "Timings",
]


def __getattr__(name: str) -> object:
    """``GuideAndRescalePipeline`` on first use: :mod:`gnr_fast.pipeline` imports diffusers' pipeline
    machinery, which ``import gnr_fast`` alone does not need."""
    if name == "GuideAndRescalePipeline":
        from .pipeline import GuideAndRescalePipeline

        return GuideAndRescalePipeline
    raise AttributeError(f"module 'gnr_fast' has no attribute {name!r}")
