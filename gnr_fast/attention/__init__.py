"""Attention instrumentation through diffusers' attention-processor API (STYLE.md §5)."""

from .capture import (
    CaptureMode,
    CaptureOutputs,
    CaptureSpec,
    PassCapture,
    Recorder,
    SelfAttnLayer,
    row_captures,
    select_layers,
)
from .processors import CaptureAttnProcessor, install_capture_processors

__all__ = [
    "CaptureAttnProcessor",
    "CaptureMode",
    "CaptureOutputs",
    "CaptureSpec",
    "PassCapture",
    "Recorder",
    "SelfAttnLayer",
    "install_capture_processors",
    "row_captures",
    "select_layers",
]
