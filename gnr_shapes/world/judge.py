"""The shapes-world judge: a small CNN that reads scene attributes back from pixels.

It predicts the background (kind and colours), the main object's shape, colour and size, and
whether a second object is present with its shape and colour. Text-to-image fidelity and edit
benchmarks compare its predictions with what a caption states (:func:`agrees_with_caption`).

Weights live in ``gnr_shapes/models/shapes-judge/`` (``model.safetensors`` + ``config.json``) and are
trained by ``python -m gnr_shapes.training.judge``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from gnr_fast.errors import ModelNotFoundError
from gnr_shapes.world.captions import ParsedCaption
from gnr_shapes.world.palette import BACKGROUND_KINDS, COLOUR_NAMES, SHAPES, SIZES
from gnr_shapes.world.scenes import SceneSpec

NONE = "none"
DEFAULT_JUDGE_DIR = Path(__file__).resolve().parent.parent / "models" / "shapes-judge"

# Output heads: name -> class names (index = class id). "none" marks an absent attribute.
HEADS: dict[str, tuple[str, ...]] = {
    "background_kind": BACKGROUND_KINDS,
    "background_colour": COLOUR_NAMES,
    "background_colour2": COLOUR_NAMES + (NONE,),
    "main_shape": SHAPES,
    "main_colour": COLOUR_NAMES,
    "main_size": SIZES,
    "second_shape": SHAPES + (NONE,),
    "second_colour": COLOUR_NAMES + (NONE,),
}


@dataclass(frozen=True)
class SceneAttributes:
    """What the judge reads from a scene (or the ground truth of a spec, see :func:`attributes_of`).

    ``background_colours`` has one entry for plain backgrounds and two otherwise;
    ``second_shape``/``second_colour`` are None when there is no second object.
    """

    background_kind: str
    background_colours: tuple[str, ...]
    main_shape: str
    main_colour: str
    main_size: str
    second_shape: str | None
    second_colour: str | None


@dataclass(frozen=True)
class JudgeConfig:
    """Architecture of the judge; saved as ``config.json`` next to the weights."""

    widths: tuple[int, ...] = (32, 64, 96, 128)
    input_size: int = 64  # images are area-resized to this side before the CNN


def attributes_of(spec: SceneSpec) -> SceneAttributes:
    """The ground-truth attributes of a spec (objects[0] is the main object)."""
    main = spec.objects[0]
    second = spec.objects[1] if len(spec.objects) > 1 else None
    return SceneAttributes(
        background_kind=spec.background.kind,
        background_colours=spec.background.colours,
        main_shape=main.shape,
        main_colour=main.colour,
        main_size=main.size,
        second_shape=second.shape if second else None,
        second_colour=second.colour if second else None,
    )


def encode_attributes(attributes: SceneAttributes) -> dict[str, int]:
    """Class ids per head for one scene."""
    colours = attributes.background_colours
    values = {
        "background_kind": attributes.background_kind,
        "background_colour": colours[0],
        "background_colour2": colours[1] if len(colours) > 1 else NONE,
        "main_shape": attributes.main_shape,
        "main_colour": attributes.main_colour,
        "main_size": attributes.main_size,
        "second_shape": attributes.second_shape or NONE,
        "second_colour": attributes.second_colour or NONE,
    }
    return {head: HEADS[head].index(value) for head, value in values.items()}


def decode_attributes(classes: dict[str, int]) -> SceneAttributes:
    """Inverse of :func:`encode_attributes`; the background kind decides how many colours count."""
    names = {head: HEADS[head][index] for head, index in classes.items()}
    kind = names["background_kind"]
    colours = (names["background_colour"],)
    if kind != "plain":
        colours += (names["background_colour2"],)
    second_shape = None if names["second_shape"] == NONE else names["second_shape"]
    second_colour = None if names["second_colour"] == NONE else names["second_colour"]
    if second_shape is None or second_colour is None:
        second_shape = second_colour = None
    return SceneAttributes(kind, colours, names["main_shape"], names["main_colour"],
                           names["main_size"], second_shape, second_colour)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
    )


class JudgeNet(nn.Module):
    """Strided conv stack -> global average + max pooling -> one linear head per attribute."""

    def __init__(self, config: JudgeConfig) -> None:
        super().__init__()
        self.config = config
        widths = (3,) + tuple(config.widths)
        self.features = nn.Sequential(*[_block(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.heads = nn.ModuleDict({
            head: nn.Linear(2 * widths[-1], len(classes)) for head, classes in HEADS.items()
        })

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: float [B, 3, S, S] in [-1, 1] (S = input_size) -> logits per head [B, C]."""
        feats = self.features(images)  # [B, C, S/16, S/16]
        pooled = torch.cat([feats.mean(dim=(2, 3)), feats.amax(dim=(2, 3))], dim=1)  # [B, 2C]
        return {head: layer(pooled) for head, layer in self.heads.items()}


def prepare_images(images: np.ndarray | torch.Tensor, input_size: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] (numpy or torch) -> float [B, 3, S, S] in [-1, 1], area-resized."""
    # A copy: images from PIL arrays are read-only, which torch warns about when sharing memory.
    x = torch.tensor(np.asarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if x.shape[-1] != input_size or x.shape[-2] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="area")
    return x


class Judge:
    """A loaded judge; :meth:`predict` maps images to :class:`SceneAttributes`."""

    def __init__(self, net: JudgeNet) -> None:
        self.net = net.eval()

    @torch.no_grad()
    def predict_classes(self, images: np.ndarray | torch.Tensor, batch: int = 128) -> dict[str, np.ndarray]:
        """Class ids per head, int arrays [B]."""
        x = prepare_images(images, self.net.config.input_size)
        outs: dict[str, list[np.ndarray]] = {head: [] for head in HEADS}
        for start in range(0, len(x), batch):
            logits = self.net(x[start : start + batch])
            for head, value in logits.items():
                outs[head].append(value.argmax(dim=1).numpy())
        return {head: np.concatenate(parts) for head, parts in outs.items()}

    def predict(self, images: np.ndarray | torch.Tensor) -> list[SceneAttributes]:
        """Attributes of each uint8 [H, W, 3] image in ``images`` ([B, H, W, 3])."""
        classes = self.predict_classes(images)
        return [decode_attributes({h: int(v[i]) for h, v in classes.items()})
                for i in range(len(next(iter(classes.values()))))]


def save_judge(net: JudgeNet, out: Path) -> None:
    """Write ``model.safetensors`` and ``config.json`` to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    config = {"config": asdict(net.config), "heads": {h: list(c) for h, c in HEADS.items()}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_judge(path: Path = DEFAULT_JUDGE_DIR) -> Judge:
    """Load the judge saved at ``path``; raises ModelNotFoundError if the weights are missing."""
    weights, config_file = path / "model.safetensors", path / "config.json"
    if not weights.exists() or not config_file.exists():
        raise ModelNotFoundError(
            f"judge weights not found in {path}; train them with python -m gnr_shapes.training.judge"
        )
    saved = json.loads(config_file.read_text())
    heads = {h: tuple(c) for h, c in saved["heads"].items()}
    if heads != HEADS:
        raise ModelNotFoundError(f"judge at {path} was trained for other classes: {heads}")
    config = JudgeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()})
    net = JudgeNet(config)
    net.load_state_dict(load_file(str(weights)))
    return Judge(net)


# Two-colour backgrounds whose caption does not say which colour comes first in the picture:
# "a red and blue striped background" describes stripes of either phase, and a checkerboard with
# either colour in the top-left square. The renderer still puts the first colour first, so the
# judge reads the colours in that order; the order is compared only where the caption states it,
# as a gradient's "red to blue" does (first colour at the top).
UNORDERED_BACKGROUNDS = frozenset({"stripes", "checks"})


def background_colours_agree(predicted: tuple[str, ...], kind: str, stated: tuple[str, ...],
                             strict_order: bool = False) -> bool:
    """Whether the predicted background colours are the stated ones: as a pair in either order
    for :data:`UNORDERED_BACKGROUNDS` (unless ``strict_order``), else in the stated order."""
    if kind in UNORDERED_BACKGROUNDS and not strict_order:
        return sorted(predicted) == sorted(stated)
    return tuple(predicted) == tuple(stated)


def agrees_with_caption(predicted: SceneAttributes, caption: ParsedCaption, strict_order: bool = False) -> bool:
    """True when every attribute the caption states matches the prediction: background kind and
    colours (:func:`background_colours_agree`), each stated object's colour and shape, and the
    main object's size. ``strict_order`` also requires the renderer's colour order for stripes and
    checks, which the caption does not state."""
    if predicted.background_kind != caption.background_kind:
        return False
    if not background_colours_agree(predicted.background_colours, caption.background_kind,
                                    caption.background_colours, strict_order):
        return False
    main = caption.objects[0]
    if (predicted.main_shape, predicted.main_colour, predicted.main_size) != (
        main.shape, main.colour, main.size):
        return False
    if len(caption.objects) == 1:
        return predicted.second_shape is None
    second = caption.objects[1]
    return (predicted.second_shape, predicted.second_colour) == (second.shape, second.colour)


def attribute_matches(predicted: Sequence[SceneAttributes], truth: Sequence[SceneAttributes]) -> dict[str, float]:
    """Per-attribute accuracy of ``predicted`` against ``truth`` (fractions in [0, 1])."""
    fields = ["background_kind", "background_colours", "main_shape", "main_colour", "main_size",
              "second_shape", "second_colour"]
    return {f: float(np.mean([getattr(p, f) == getattr(t, f) for p, t in zip(predicted, truth)]))
            for f in fields} | {"all": float(np.mean([p == t for p, t in zip(predicted, truth)]))}
