"""Exported UNets for the plain calls: ONNX files and TensorRT engines, with the record of what
each was made from (DESIGN.md §8–9)."""

from .info import ExportInfo
from .onnx import export_onnx, export_unet_onnx

__all__ = ["ExportInfo", "export_onnx", "export_unet_onnx"]
