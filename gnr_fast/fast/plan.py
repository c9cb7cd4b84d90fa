"""Per-step execution plans: which UNet passes run, batched how, and which need autograd (DESIGN.md §3, §8).

The reference runs four passes every step with two autograd graphs alive. A plan keeps only
what the active guiders read at that step:

* no guider pass and no backward when no energy is active (2 rows in one no-grad call; one for a
  consistency model, whose sampler needs ε_trg alone: :class:`~gnr_fast.noise_terms.NoiseRows`);
* the no-grad rows (ε_u, the CFG prompt pass when no guider differentiates it, the source
  trajectory pass ``inv_inv``) batched into one call;
* the rows a gradient flows through (``cur_inv``, ``cur_trg``) in one grad call;
* the source pass dropped when its internals are cached with the inversion.

Each call is marked with its :class:`~gnr_fast.runtime.CallKind`: ``PLAIN`` (no grad, no
captures; any backend), ``CAPTURING`` (no grad, returns the source pass's internals) or ``GRAD``.
A no-grad call holding the source row is CAPTURING, with the source row last; with
``split_source`` (the plain and capturing backends differ) the source row gets a CAPTURING call of
its own and the other no-grad rows a PLAIN call.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..config import EditConfig
from ..guiders import Guider, Role, cfg_guider, energy_guiders, scale_at
from ..noise_terms import Eps, NoiseRows
from ..runtime.calls import CallKind
from ..samplers.ddim import DDIMSampler

__all__ = ["Eps", "Latent", "Prompt", "Row", "StepPlan", "UNetCall", "energies_vanish", "plan_edit", "plan_step"]


class Latent(str, Enum):
    CUR = "z"  # the current latent z_t
    SRC = "z*"  # the paired inversion latent z*_t


class Prompt(str, Enum):
    UNCOND = "uncond"
    SRC = "src"
    TRG = "trg"


@dataclass(frozen=True)
class Row:
    """One batch row of a UNet call: its inputs, the role it is captured as, and the ε it supplies."""

    latent: Latent
    prompt: Prompt
    role: Role | None = None  # captured for guiders as this role
    supplies: Eps | None = None  # the noise prediction this row's output is

    def __str__(self) -> str:
        tag = self.role.value if self.role else self.supplies.value if self.supplies else None
        return f"{self.latent.value}|{self.prompt.value}({tag})"


@dataclass(frozen=True)
class UNetCall:
    """One batched UNet call of one :class:`CallKind`; GRAD calls keep an autograd graph w.r.t. z."""

    rows: tuple[Row, ...]
    kind: CallKind

    @property
    def grad(self) -> bool:
        return self.kind is CallKind.GRAD

    def __str__(self) -> str:
        return f"{self.kind.value}[{', '.join(map(str, self.rows))}]"


@dataclass(frozen=True)
class StepPlan:
    """What step ``step`` runs: its UNet calls and the energy guiders whose gradient it takes."""

    step: int
    calls: tuple[UNetCall, ...]
    energies: tuple[Guider, ...]

    @property
    def rows(self) -> int:
        """UNet batch rows in total (the work measure: one row = one single-image pass)."""
        return sum(len(c.rows) for c in self.calls)

    @property
    def backward(self) -> bool:
        return bool(self.energies)

    def describe(self) -> str:
        return f"step {self.step}: " + " + ".join(map(str, self.calls)) + (" + backward" if self.backward else "")


def plan_step(
    config: EditConfig,
    step: int,
    source_cached: bool = False,
    energies_vanish: bool = False,
    split_source: bool = False,
    noise_rows: NoiseRows = DDIMSampler.noise_rows,
) -> StepPlan:
    """The plan for ``step``.

    ``source_cached``: the ``inv_inv`` internals of this step come from the inversion cache.
    ``energies_vanish``: z equals z* exactly (step 0 of the reference pairing), so every energy
    comparing the current and the source pass under the same prompt is exactly 0 — the
    reference runs no backward for those, and neither does the plan. Energies reading the
    target-prompt pass (``cur_trg``) do not vanish.
    ``split_source``: run the source row in a CAPTURING call of its own (see the module docstring).
    ``noise_rows``: what the sampler's noise needs (:class:`~gnr_fast.noise_terms.NoiseRows`): DDIM's
    ε_u and CFG prompt rows, or a consistency model's ε_trg row and the source pass's ε_inv.
    """
    cfg = cfg_guider(config.guiders)
    cfg_prompt = Prompt.SRC if cfg.is_source_guidance else Prompt.TRG
    cfg_supply = Eps.SRC if cfg.is_source_guidance else Eps.TRG
    same_prompt = {Role.CUR_INV, Role.INV_INV}
    energies = tuple(
        g
        for g in energy_guiders(config.guiders)
        if g.is_active(step) and not (energies_vanish and set(g.reads) <= same_prompt)
    )
    roles = {role for g in energies for role in g.reads}

    grad_rows: list[Row] = []
    if Role.CUR_INV in roles:
        grad_rows.append(Row(Latent.CUR, Prompt.SRC, Role.CUR_INV, Eps.SRC))
    if Role.CUR_TRG in roles:
        grad_rows.append(Row(Latent.CUR, Prompt.TRG, Role.CUR_TRG, Eps.TRG))
    supplied_by_grad = {r.supplies for r in grad_rows}

    plain_rows = []
    if noise_rows.base is Eps.U:
        plain_rows.append(Row(Latent.CUR, Prompt.UNCOND, None, Eps.U))
    elif noise_rows.base not in supplied_by_grad:  # ε_trg, its w embedding carrying the CFG
        plain_rows.append(Row(Latent.CUR, Prompt.TRG, None, noise_rows.base))
    if noise_rows.cfg_row and scale_at(cfg.scale, step) != 0.0 and cfg_supply not in supplied_by_grad:
        plain_rows.append(Row(Latent.CUR, cfg_prompt, None, cfg_supply))
    needs_source = Role.INV_INV in roles or (noise_rows.source_noise and bool(energies))
    source_supply = Eps.INV if noise_rows.source_noise else None
    source_rows = [Row(Latent.SRC, Prompt.SRC, Role.INV_INV, source_supply)] if needs_source and not source_cached else []

    if not source_rows:
        calls = [UNetCall(tuple(plain_rows), CallKind.PLAIN)] if plain_rows else []
    elif split_source or not plain_rows:
        calls = [UNetCall(tuple(plain_rows), CallKind.PLAIN)] if plain_rows else []
        calls.append(UNetCall(tuple(source_rows), CallKind.CAPTURING))
    else:  # the recorded source row last: a capture spec names trailing rows
        calls = [UNetCall(tuple(plain_rows + source_rows), CallKind.CAPTURING)]
    if grad_rows:
        calls.append(UNetCall(tuple(grad_rows), CallKind.GRAD))
    return StepPlan(step=step, calls=tuple(calls), energies=energies)


def energies_vanish(config: EditConfig, step: int) -> bool:
    """Whether the edit loop's z equals z* at ``step``: step 0 under the reference pairing, where
    the loop starts from inv[N], the very latent paired with step 0 (a static fact, no comparison)."""
    return step == 0 and config.align_inversion == "reference"


def plan_edit(
    config: EditConfig, source_cached: bool = False, split_source: bool = False,
    noise_rows: NoiseRows = DDIMSampler.noise_rows,
) -> tuple[StepPlan, ...]:
    """The plan of every step of an edit: an image's first edit (``source_cached=False``) or a
    later one whose source pass the inversion cache serves at every step.

    Under the reference pairing, step 0 starts at z = z*, so its same-prompt energies vanish
    (:func:`plan_step`); under ``"exact"`` pairing they do not.
    """
    return tuple(
        plan_step(config, step, source_cached=source_cached, energies_vanish=energies_vanish(config, step),
                  split_source=split_source, noise_rows=noise_rows)
        for step in range(config.num_steps)
    )
