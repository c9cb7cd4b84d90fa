"""What an exported UNet was made from, stored with it, and the check that refuses a mismatched one.

An ONNX export carries its :class:`ExportInfo` twice: as JSON in the ONNX model's
``metadata_props`` (key :data:`METADATA_KEY`, read back by ONNX Runtime without parsing the graph)
and as ``export.json`` beside the file (for people, and for the TensorRT engine builder, which
copies it into the engine's own ``.json``). Loading an export compares it with the model, dtype
and size it is about to serve (:meth:`ExportInfo.check`), so an export of another checkpoint is
refused instead of producing wrong ε.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import ExportError, ExportMismatchError

METADATA_KEY = "gnr_fast.export"
INFO_FILE = "export.json"
FORMAT_VERSION = 1  # bump when the graph's inputs/outputs or this record change meaning

INPUT_NAMES = ("sample", "timestep", "context")  # [B, 4, h, w], [B], [B, 77, C]; float32 whatever the dtype
# then the model family's extra inputs, e.g. ("timestep_cond",) [B, W] for guidance-embedding UNets
OUTPUT_NAMES = ("eps",)  # [B, 4, h, w] float32 (ε, or v for v-prediction checkpoints)

EXPORT_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class ExportInfo:
    """The model, precision and shapes an exported UNet serves.

    ``latent_sizes`` are the (h, w) latent sizes the export was made and checked for (image
    size ÷ the VAE factor, 8 for SD); the batch axis is dynamic within ``[min_batch, max_batch]``.
    """

    unet_id: str  # gnr_fast.fingerprint.unet_fingerprint of the exported UNet: what a loaded UNet is matched by
    dtype: str  # one of EXPORT_DTYPES: the precision the graph computes in (its IO is float32)
    latent_sizes: tuple[tuple[int, int], ...]
    min_batch: int
    max_batch: int
    in_channels: int
    out_channels: int
    context_len: int  # 77 for CLIP
    context_dim: int  # cross_attention_dim (768 for SD 1.x, 1024 for SD 2.x)
    exporter: str  # "torchscript" or "dynamo" (torch.onnx.export's two exporters)
    opset: int
    gnr_fast_version: str
    onnx_file: str = "unet.onnx"  # relative to the export folder
    external_data: bool = False  # weights in onnx_file + ".data" (models over 2 GB)
    model_id: str = ""  # the checkpoint's gnr_fast.loading model id, when exported from a checkpoint
    input_names: tuple[str, ...] = INPUT_NAMES  # the graph's inputs in order (the family's ExportIO.inputs)
    format_version: int = FORMAT_VERSION
    torch_version: str = field(default="", compare=False)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> ExportInfo:
        """Parse the record written by :meth:`to_json`; ``where`` names its file in error messages."""
        try:
            data = json.loads(text)
            if data.get("format_version") != FORMAT_VERSION:
                raise ExportMismatchError(
                    f"{where} is a gnr-fast export of format {data.get('format_version')!r}, this gnr-fast reads "
                    f"format {FORMAT_VERSION}; export it again with `gnr-fast export onnx`"
                )
            data["latent_sizes"] = tuple(tuple(int(v) for v in size) for size in data["latent_sizes"])
            if "input_names" in data:  # records written before extra inputs existed have the plain three
                data["input_names"] = tuple(str(name) for name in data["input_names"])
            return cls(**data)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"{where} has no valid gnr-fast export record ({exc}); export it again") from exc

    def write(self, folder: Path) -> Path:
        path = folder / INFO_FILE
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def read(cls, folder: str | Path) -> ExportInfo:
        """The record in ``folder/export.json``; :class:`ExportError` if the folder is not an export."""
        path = Path(folder) / INFO_FILE
        if not path.is_file():
            raise ExportError(
                f"{str(folder)!r} is not a gnr-fast ONNX export ({INFO_FILE} not found); make one with "
                "`gnr-fast export onnx --model PATH --out DIR`"
            )
        return cls.from_json(path.read_text(), str(path))

    def check(
        self,
        unet_id: str | None = None,
        dtype: str | None = None,
        latent_size: tuple[int, int] | None = None,
        batch: int | None = None,
        where: str = "the export",
        input_names: tuple[str, ...] | None = None,
    ) -> None:
        """Raise :class:`ExportMismatchError` unless this export serves every given value
        (``input_names``: the inputs the loaded UNet's family calls with, checked first)."""
        if input_names is not None and tuple(input_names) != self.input_names:
            missing = [name for name in input_names if name not in self.input_names]
            raise ExportMismatchError(
                f"{where} takes inputs {list(self.input_names)}, but the loaded UNet is called with "
                f"{list(input_names)}" + (f" (the export lacks {missing})" if missing else "") + "; export this "
                "checkpoint's UNet again (`gnr-fast export onnx --model PATH`) with this gnr-fast"
            )
        if unet_id is not None and unet_id != self.unet_id:
            made_from = f"model {self.model_id} (UNet {self.unet_id})" if self.model_id else f"UNet {self.unet_id}"
            raise ExportMismatchError(
                f"{where} was made from {made_from}, but the loaded UNet is {unet_id}; export this "
                "checkpoint again (`gnr-fast export onnx --model PATH`) or load the checkpoint it was made from"
            )
        if dtype is not None and dtype != self.dtype:
            raise ExportMismatchError(
                f"{where} runs in {self.dtype}, but {dtype} was asked for; export again with --dtype {dtype}"
            )
        if latent_size is not None and tuple(latent_size) not in self.latent_sizes:
            raise ExportMismatchError(
                f"{where} serves latent sizes {list(self.latent_sizes)} (h, w), not {tuple(latent_size)}; export "
                "again with --height/--width of this image size (image side = 8 x latent side)"
            )
        if batch is not None and not self.min_batch <= batch <= self.max_batch:
            raise ExportMismatchError(
                f"{where} serves batches of {self.min_batch}..{self.max_batch} rows, not {batch}; export again "
                f"with a larger batch range"
            )
