"""Few-step Guide-and-Rescale on consistency models: the planned UNet calls of one guided step, the
source-pass cache, and the whole edit (README_consistency.md §4–8).

One editing step i of a batch of images, each with its current latent z and inverted latent z*:

1. ε_inv = U_rev(z*, t, c_src, w = 0): a *capturing* call (features, Q/K and lse of the selected
   self-attention layers), no gradient; kept per (inversion, step) so a repeat edit skips it.
2. If some energy guider is active at step i: one *grad* call over the rows
   [z, c_src, w = 0] (only when a guider reads the source prompt at z, e.g. the attention maps) and
   [z, c_trg, w = w_i]; E = Σ_g v_g(i) · E_g; ∂E/∂z by one backward. Otherwise one *plain* call
   [z, c_trg, w_i] and no ε_inv at all.
3. γ from the range rescaler with reference ε_trg − ε_inv; ε = ε_trg + γ · ∂E/∂z (the sampler's
   :func:`~gnr_fast.samplers.consistency.compose_consistency_noise`).

Energies are the DDIM edit's guiders (the registry's :func:`~gnr_fast.guiders.guider_energy`) on
the same captures; w is the cfg guider's per-step scale, given to the UNet as its guidance-scale
embedding (the model family's extra input).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .attention.capture import CaptureSpec, PassCapture, SelfAttnLayer, check_sites, row_captures, select_layers
from .config import CONSISTENCY_PRESET_NAMES, EditConfig
from .consistency_models import ConsistencyFiles, ConsistencyUNets, load_consistency_unets
from .errors import ConfigError, GuidanceError, InputError, ModelLoadError
from .families import GuidanceEmbeddingSD, family_for
from .guiders import Role, capture_need, cfg_guider, energy_guiders, guider_energy, scale_at
from .images import PreparedImage, decode_latent, encode_latent, prepare_image, to_output_image
from .loading import Components, load_components, read_json
from .model_defaults import load_model_defaults
from .prompts import encode_prompt
from .rescaling import rescale_gamma
from .results import Timings
from .runtime.modules import CapturingUNet, PlainUNet
from .samplers.consistency import ConsistencySampler, compose_consistency_noise, invert_consistency, sample_consistency

logger = logging.getLogger(__name__)

COMPILERS = (None, "aot_eager", "inductor")
"""How the UNet calls run: eagerly (None) or through ``torch.compile`` with that backend."""


def is_consistency_model(path: object) -> bool:
    """Whether ``path`` is a model folder whose ``gnr_fast.json`` names the consistency sampler."""
    return isinstance(path, (str, Path)) and Path(path).is_dir() and load_model_defaults(path).sampler == "consistency"


def compiler_for_runtime(runtime: object) -> str | None:
    """The :data:`COMPILERS` entry an editor's ``runtime`` argument asks for: ``None``/``"eager"``
    run eagerly, ``"compiled"`` with inductor; other runtimes do not serve consistency models yet."""
    if runtime is None or runtime == "eager":
        return None
    if runtime == "compiled":
        return "inductor"
    raise ConfigError(f"runtime={runtime!r} is not available for consistency models; use 'eager' or 'compiled'")


class ConsistencyCall(str, Enum):
    """The kinds of UNet call of a consistency edit (DESIGN.md §9's three, plus the forward model's)."""

    INVERT = "invert"  # forward model, plain
    PLAIN = "plain"  # reverse model, no grad, no captures (a step without active energies)
    CAPTURING = "capturing"  # reverse model, no grad, the source pass on z*
    GRAD = "grad"  # reverse model, autograd on, captures for the energies' backward


class ConsistencyCalls:
    """The counted UNet calls of both consistency models through the model-family seam.

    ``compiler`` None runs eagerly; ``"aot_eager"`` or ``"inductor"`` runs every call through
    ``torch.compile(fullgraph=True, dynamic=False)`` with that backend (one graph per call kind,
    batch size and spec). ``rows`` counts UNet batch rows per :class:`ConsistencyCall`.
    """

    def __init__(self, unets: ConsistencyUNets, compiler: str | None = None) -> None:
        if compiler not in COMPILERS:
            raise ConfigError(f"compiler must be one of {list(COMPILERS)}, got {compiler!r}")
        family = family_for(unets.reverse.config)
        if not isinstance(family, GuidanceEmbeddingSD):
            raise ModelLoadError("a consistency edit needs UNets with a guidance-scale embedding (time_cond_proj_dim)")
        self.family = family
        self.layers: list[SelfAttnLayer]
        self.layers, self.feature_sites = family.install_captures(unets.reverse)
        self.device = next(unets.reverse.parameters()).device
        modules = (PlainUNet(unets.forward, family), PlainUNet(unets.reverse, family), CapturingUNet(unets.reverse, family))
        if compiler is not None:
            modules = tuple(torch.compile(m, fullgraph=True, dynamic=False, backend=compiler) for m in modules)
        self._forward, self._plain, self._capturing = modules
        self.compiler = compiler
        self.rows: Counter[ConsistencyCall] = Counter()
        self.calls: Counter[ConsistencyCall] = Counter()

    def _count(self, kind: ConsistencyCall, rows: int) -> None:
        self.calls[kind] += 1
        self.rows[kind] += rows

    def _timestep(self, t: int) -> torch.Tensor:
        return torch.tensor(int(t), dtype=torch.long, device=self.device)

    def forward_eps(self, x: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
        """ε of the forward (inversion) model at w = 0 for every row of ``x`` [B, 4, h, w]."""
        self._count(ConsistencyCall.INVERT, x.shape[0])
        extras = self.family.guidance_extras([0.0] * x.shape[0], self.device)
        with torch.no_grad():
            return self._forward(x, self._timestep(t), context.expand(x.shape[0], -1, -1), *extras)

    def plain(self, z: torch.Tensor, t: int, context: torch.Tensor, w: Sequence[float]) -> torch.Tensor:
        """ε of the reverse model, rows with guidance scales ``w``, no grad."""
        self._count(ConsistencyCall.PLAIN, z.shape[0])
        with torch.no_grad():
            return self._plain(z, self._timestep(t), context, *self.family.guidance_extras(w, self.device))

    def capture(
        self, z: torch.Tensor, t: int, context: torch.Tensor, w: Sequence[float], spec: CaptureSpec
    ) -> tuple[torch.Tensor, list[PassCapture]]:
        """ε of the reverse model and one :class:`PassCapture` per row of ``spec.rows``; a grad call
        when grad mode is on and ``z`` requires grad."""
        check_sites(spec, self.feature_sites)
        grad = torch.is_grad_enabled() and z.requires_grad
        self._count(ConsistencyCall.GRAD if grad else ConsistencyCall.CAPTURING, z.shape[0])
        eps, outputs = self._capturing(z, self._timestep(t), context, spec, *self.family.guidance_extras(w, self.device))
        return eps, row_captures(spec, outputs, self.layers)


@dataclass
class ConsistencyInversion:
    """The source trajectory of one image under one source prompt, and its source passes.

    ``latents[0]`` is the clean latent, ``latents[K]`` the start of editing; ``source_passes[i]``
    holds step i's (ε_inv, capture) once an edit ran it (kept for repeat edits).
    """

    latents: torch.Tensor  # [K + 1, 1, 4, h, w] float32
    source_prompt: str
    content_hash: str
    image: PreparedImage
    input_mean: float  # of the input's uint8 pixels: the colour statistics the output is matched to
    input_std: float
    source_passes: dict[int, tuple[torch.Tensor, PassCapture]] = field(default_factory=dict, repr=False)


@dataclass
class StepItem:
    """One image of a batched editing step."""

    z: torch.Tensor  # [1, 4, h, w]
    inversion: ConsistencyInversion
    c_src: torch.Tensor  # [1, 77, C]
    c_trg: torch.Tensor  # [1, 77, C]


@dataclass
class ConsistencyTerms:
    """The noise terms of one step of one image (float32; ``gamma`` and ``energy`` 0-dim)."""

    eps_trg: torch.Tensor
    eps_inv: torch.Tensor | None  # None: no energy active (ε_inv not needed)
    eps_src: torch.Tensor | None  # ε(z, c_src, w = 0), run only when an energy reads it (its captures)
    guider_grad: torch.Tensor | None
    gamma: torch.Tensor
    energy: torch.Tensor
    eps_final: torch.Tensor


def match_color_stats(image: np.ndarray, mean: float, std: float) -> np.ndarray:
    """(img − m) · S / s + M clipped to [0, 255] and truncated to uint8, with (m, s) the image's
    mean and population std over all pixels and channels, (M, S) the input's; unchanged when
    s < 1e-7 (the authors' ``match_stats_255``)."""
    img_mean, img_std = image.mean(), image.std()
    if img_std < 1e-7:
        return image
    return np.clip((image - img_mean) * (std / img_std) + mean, 0, 255).astype(np.uint8)


class ConsistencyEditor:
    """Few-step GaR edits with a consistency model (4 inversion jumps + 4 guided editing jumps)."""

    def __init__(
        self,
        components: Components,
        unets: ConsistencyUNets,
        sampler: ConsistencySampler,
        config: EditConfig | None = None,
        compiler: str | None = None,
        progress: bool = False,
    ) -> None:
        self.components = components
        self.unets = unets
        self.sampler = sampler
        self.config = config if config is not None else EditConfig.consistency(sampler.num_steps)
        self.check_config(self.config)
        self.calls = ConsistencyCalls(unets, compiler)
        self.progress = progress
        self._prompts: dict[str, torch.Tensor] = {}
        self._inversions: dict[tuple[str, str], ConsistencyInversion] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        teacher_unet: str | Path | None = None,
        reverse_lora: str | Path | None = None,
        forward_lora: str | Path | None = None,
        lora_alpha: float | None = None,
        config: EditConfig | None = None,
        compiler: str | None = None,
        progress: bool = False,
        dtype: torch.dtype | str = torch.float32,
    ) -> ConsistencyEditor:
        """Load an SD 1.x pipeline folder and its consistency files: those ``gnr_fast.json`` names
        (``docs/consistency-models.md``), each replaced by an explicit argument when given.
        float32 only (``dtype`` float32 or ``"auto"``; the golden is matched in float32)."""
        if dtype not in (torch.float32, "auto"):
            raise ConfigError(f"consistency models run in float32 for now, got dtype={dtype}; use torch.float32")
        path = Path(path)
        defaults = load_model_defaults(path).consistency
        explicit = (teacher_unet, reverse_lora, forward_lora)
        if defaults is None and any(f is None for f in explicit):
            raise ModelLoadError(
                f"{str(path)!r} names no consistency files (no 'consistency' object in its gnr_fast.json); pass "
                "teacher_unet=, reverse_lora= and forward_lora= (CLI: --teacher-unet, --reverse-lora, --forward-lora)"
            )
        files = ConsistencyFiles(
            teacher_unet=Path(teacher_unet) if teacher_unet is not None else defaults.teacher_unet,
            reverse_lora=Path(reverse_lora) if reverse_lora is not None else defaults.reverse_lora,
            forward_lora=Path(forward_lora) if forward_lora is not None else defaults.forward_lora,
            lora_alpha=float(lora_alpha) if lora_alpha is not None else (defaults.lora_alpha if defaults else 8.0),
        )
        components = load_components(path, device=device, dtype=torch.float32)
        unets = load_consistency_unets(read_json(path / "unet" / "config.json"), files, torch.float32, components.device)
        components.unet = unets.reverse  # the pipeline's own UNet weights are never used
        boundaries = defaults.timesteps if defaults is not None else ConsistencySampler.boundaries
        sampler = ConsistencySampler(components.schedule.alphas_cumprod, tuple(boundaries))
        return cls(components, unets, sampler, config=config, compiler=compiler, progress=progress)

    def check_config(self, config: EditConfig) -> None:
        """Raise :class:`ConfigError` for a config this sampler cannot run (step count, guiders)."""
        if config.num_steps != self.sampler.num_steps:
            raise ConfigError(f"this consistency model edits in {self.sampler.num_steps} steps (its boundaries "
                              f"{list(self.sampler.boundaries)}), but the config has num_steps={config.num_steps}")
        if any(g.kind.value == "direct" for g in config.guiders):
            raise ConfigError("direct-noise guiders (latents_diff) are not supported by the consistency sampler")

    # --- prompts, inversion -----------------------------------------------------------------

    def forget_inversions(self) -> None:
        """Drop every kept inversion and its source passes (the next edit of an image is a first edit)."""
        self._inversions.clear()

    def embed(self, prompt: str) -> torch.Tensor:
        """The text embedding [1, 77, C] of ``prompt`` (cached per prompt)."""
        if prompt not in self._prompts:
            with torch.no_grad():
                self._prompts[prompt] = encode_prompt(self.components, prompt).float()
        return self._prompts[prompt]

    def encode(self, image: PreparedImage) -> torch.Tensor:
        """z_0 = latent scale · VAE posterior mean: [1, 4, h, w] float32."""
        return encode_latent(self.components.vae, image.pixels, self.calls.family.latent_scale(self.components.vae))

    def invert(self, image: object, source_prompt: str) -> ConsistencyInversion:
        """The forward-model trajectory of ``image`` (cached per image content and source prompt)."""
        prepared = image if isinstance(image, PreparedImage) else prepare_image(image)
        key = (prepared.content_hash, source_prompt)
        if key in self._inversions:
            return self._inversions[key]
        z0 = self.encode(prepared)
        c_src = self.embed(source_prompt)
        latents = invert_consistency(lambda x, t: self.calls.forward_eps(x, t, c_src), z0, self.sampler,
                                     progress=self.progress)
        pixels = np.asarray(((prepared.pixels[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        inversion = ConsistencyInversion(latents, source_prompt, prepared.content_hash, prepared,
                                         float(pixels.mean()), float(pixels.std()))
        self._inversions[key] = inversion
        return inversion

    # --- one guided step ----------------------------------------------------------------------

    def _source_passes(self, items: Sequence[StepItem], step: int, spec: CaptureSpec) -> list[tuple[torch.Tensor, PassCapture]]:
        """Step ``step``'s (ε_inv, capture) of every item: from each inversion's cache, the rest in
        one capturing call over the distinct inversions not yet cached."""
        t = self.sampler.timesteps[step]
        missing = list({id(it.inversion): it.inversion for it in items if step not in it.inversion.source_passes}.values())
        if missing:
            num = self.sampler.num_steps
            z_star = torch.cat([inv.latents[num - step] for inv in missing])  # [S, 4, h, w]
            context = torch.cat([self.embed(inv.source_prompt) for inv in missing])
            with torch.no_grad():
                eps, caps = self.calls.capture(z_star, t, context, [0.0] * len(missing), spec)
            for j, inv in enumerate(missing):
                inv.source_passes[step] = (eps[j : j + 1], caps[j])
        return [it.inversion.source_passes[step] for it in items]

    def batch_step(self, items: Sequence[StepItem], step: int) -> list[ConsistencyTerms]:
        """The noise terms of editing step ``step`` for every item, with shared UNet calls."""
        config = self.config
        t = self.sampler.timesteps[step]
        w = scale_at(cfg_guider(config.guiders).scale, step)
        energies = [g for g in energy_guiders(config.guiders) if g.is_active(step)]
        count = len(items)
        z = torch.cat([it.z.detach().float() for it in items])  # [B, 4, h, w]
        c_trg = torch.cat([it.c_trg for it in items])
        if not energies:
            eps_trg = self.calls.plain(z, t, c_trg, [w] * count)
            one = torch.ones((), device=z.device)
            return [ConsistencyTerms(eps_trg[b : b + 1], None, None, None, one, torch.zeros((), device=z.device),
                                     eps_trg[b : b + 1]) for b in range(count)]
        layers = select_layers(self.calls.layers, config.self_attn_layers)

        def spec_for(roles: set[Role], rows: int, with_lse: bool) -> CaptureSpec:
            need = capture_need(energies, roles)
            return CaptureSpec(layers if need.attention else frozenset(), need.feature_sites, tuple(range(rows)), with_lse)

        sources = self._source_passes(items, step, spec_for({Role.INV_INV}, 1, True))
        with_src = any(Role.CUR_INV in g.reads for g in energies)  # an energy reads the source prompt at z
        z_cur = z.clone().requires_grad_(True)
        rows = [z_cur] * (2 if with_src else 1)  # [z, c_src, w=0] rows first, then [z, c_trg, w_i]
        contexts = ([torch.cat([it.c_src for it in items])] if with_src else []) + [c_trg]
        scales = ([0.0] * count if with_src else []) + [w] * count
        roles = {Role.CUR_INV, Role.CUR_TRG} if with_src else {Role.CUR_TRG}
        with torch.enable_grad():
            eps, caps = self.calls.capture(torch.cat(rows), t, torch.cat(contexts), scales,
                                           spec_for(roles, len(scales), False))
            eps_trg = eps[-count:].detach()
            total = None
            per_item = []
            for b in range(count):
                captures = {Role.INV_INV: sources[b][1], Role.CUR_TRG: caps[-count + b]}
                if with_src:
                    captures[Role.CUR_INV] = caps[b]
                energy = torch.zeros((), device=z.device)
                for guider in energies:
                    value = guider_energy(guider, step, captures, layers).float()
                    # |E| <= atol counts as zero (the reference's allclose skip)
                    energy = energy + torch.where(value.abs() > config.energy_atol, value, torch.zeros_like(value))
                per_item.append(energy)
                total = energy if total is None else total + energy
            (grad,) = torch.autograd.grad(total, z_cur, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(z)
        terms = []
        for b in range(count):
            eps_inv = sources[b][0]
            guider_grad = grad[b : b + 1]
            gamma = rescale_gamma(config.rescale, eps_trg[b : b + 1] - eps_inv, guider_grad)
            eps_final = compose_consistency_noise(eps_trg[b : b + 1], gamma, guider_grad)
            eps_src = eps[b : b + 1].detach() if with_src else None
            terms.append(ConsistencyTerms(eps_trg[b : b + 1], eps_inv, eps_src, guider_grad, gamma, per_item[b].detach(),
                                          eps_final.detach()))
        return terms

    # --- whole edits --------------------------------------------------------------------------

    def edit_latents(self, inversions: Sequence[ConsistencyInversion], source_prompts: Sequence[str],
                     target_prompts: Sequence[str]) -> list[torch.Tensor | GuidanceError]:
        """The edited latents ([1, 4, h, w] float32) of several images edited as one batch (same
        size), or the :class:`GuidanceError` of an image whose latent turned non-finite."""
        c_src = [self.embed(p) for p in source_prompts]
        c_trg = [self.embed(p) for p in target_prompts]
        trajectory = torch.cat([inv.latents for inv in inversions], dim=1)  # [K + 1, B, 4, h, w]

        def noise(z: torch.Tensor, z_star: torch.Tensor, step: int) -> torch.Tensor:
            items = [StepItem(z[b : b + 1], inv, c_src[b], c_trg[b]) for b, inv in enumerate(inversions)]
            return torch.cat([term.eps_final for term in self.batch_step(items, step)])

        z = sample_consistency(noise, trajectory, self.sampler, progress=self.progress)
        finite = torch.isfinite(z.flatten(1)).all(dim=1).tolist()  # the edit's one host sync
        return [z[b : b + 1] if ok else GuidanceError(
                    "the edit produced non-finite latents; lower the guider scales or check the model")
                for b, ok in enumerate(finite)]

    def decode(self, latent: torch.Tensor, inversion: ConsistencyInversion) -> tuple[np.ndarray, np.ndarray]:
        """(plain decode, colour-matched output) of an edited latent, both uint8 [H, W, 3]."""
        decoded = decode_latent(self.components.vae, latent, self.calls.family.latent_scale(self.components.vae))[0]
        return decoded, match_color_stats(decoded, inversion.input_mean, inversion.input_std)

    def edit(
        self,
        image: object,
        target_prompt: str,
        source_prompt: str | None = None,
        preset: str | None = None,
        config: EditConfig | str | Path | None = None,
        num_steps: int | None = None,
        progress: bool | None = None,
    ) -> ConsistencyResult:
        """Edit ``image`` (path, PIL image or uint8 array) toward ``target_prompt``: the keywords of
        :meth:`gnr_fast.Editor.edit` that apply. ``preset`` may only be ``"consistency"``; ``config``
        an :class:`EditConfig` or a YAML file with this model's step count; ``num_steps`` must be the
        model's (4). The image is colour-matched to the input, at the input's size."""
        if source_prompt is None:
            raise InputError("source_prompt is required: a consistency edit inverts the image under it")
        if num_steps is not None and num_steps != self.sampler.num_steps:
            raise ConfigError(f"this consistency model edits in {self.sampler.num_steps} steps, got num_steps={num_steps}")
        if preset is not None and preset not in CONSISTENCY_PRESET_NAMES:
            raise ConfigError(f"preset {preset!r} is a DDIM preset; a consistency model takes "
                              f"{list(CONSISTENCY_PRESET_NAMES)}")
        chosen = self.config
        if config is not None:
            chosen = config if isinstance(config, EditConfig) else EditConfig.from_yaml(config)
            self.check_config(chosen)
        saved, self.config = self.config, chosen
        saved_progress, self.progress = self.progress, self.progress if progress is None else progress
        try:
            return self.edit_batch([(image, source_prompt, target_prompt)])[0]
        finally:
            self.config, self.progress = saved, saved_progress

    def edit_batch(self, requests: Sequence[tuple[object, str, str]]) -> list[ConsistencyResult]:
        """Edit several (image, source prompt, target prompt) requests as one batch; every image must
        have the same size. Repeat edits of an image under the same source prompt reuse its
        inversion and source passes."""
        if not requests:
            raise InputError("edit_batch needs at least one (image, source_prompt, target_prompt) request")
        rows_before, calls_before = sum(self.calls.rows.values()), sum(self.calls.calls.values())
        start = time.perf_counter()
        inversions = [self.invert(image, src) for image, src, _ in requests]
        inverted = time.perf_counter()
        latents = self.edit_latents(inversions, [r[1] for r in requests], [r[2] for r in requests])
        edited = time.perf_counter()
        outputs = []
        for latent, inversion in zip(latents, inversions):
            if isinstance(latent, GuidanceError):
                raise latent
            decoded, matched = self.decode(latent, inversion)
            outputs.append((latent, decoded, matched, inversion))
        done = time.perf_counter()
        timings = Timings(inverted - start, edited - inverted, done - edited)
        rows, calls = sum(self.calls.rows.values()) - rows_before, sum(self.calls.calls.values()) - calls_before
        return [ConsistencyResult(to_output_image(matched, inversion.image.original_size), latent, decoded, matched,
                                  inversion, timings, calls, rows, len(requests))
                for latent, decoded, matched, inversion in outputs]


@dataclass
class ConsistencyResult:
    """A consistency edit: the output image (colour-matched, at the input's size), the edited latent,
    the plain decode and the matched array at the working size, timings and the UNet work of the
    batch it ran in."""

    image: Image.Image
    latents: torch.Tensor  # [1, 4, h, w] float32
    decoded: np.ndarray  # uint8 [H, W, 3]: the VAE decode, truncated
    matched: np.ndarray  # uint8 [H, W, 3]: after the colour-statistics matching
    inversion: ConsistencyInversion
    timings: Timings
    unet_calls: int
    unet_rows: int
    batch_size: int = 1

