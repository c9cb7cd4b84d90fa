"""Attention instrumentation through diffusers' attention-processor API (STYLE.md §5)."""

from .capture import CaptureMode, PassCapture, SelfAttnLayer, capture_features, select_layers
from .processors import CaptureAttnProcessor, install_capture_processors

__all__ = [
    "CaptureAttnProcessor",
    "CaptureMode",
    "PassCapture",
    "SelfAttnLayer",
    "capture_features",
    "install_capture_processors",
    "select_layers",
]
