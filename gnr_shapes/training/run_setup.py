"""The start and the stop of a training run, shared by the training scripts: threads, seed, run log
and deadline at the start; the deadline check at the top of each step; the ``--smoke`` sizes of the
distillation scripts."""

from __future__ import annotations

import argparse

import torch

from gnr_shapes.training.checkpoints import RunLog
from gnr_shapes.training.schedule import TimeBudget, parse_deadline


def start_run(args: argparse.Namespace) -> tuple[RunLog, float | None]:
    """Set the torch threads (``args.threads``) and seed (``args.seed``); return the run log of
    ``args.out`` and the deadline of ``args.deadline`` (epoch seconds or None)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return RunLog(args.out), parse_deadline(args.deadline)


def deadline_reached(budget: TimeBudget, step: int, log: RunLog) -> bool:
    """True (and logged) once ``budget``'s deadline has passed: the step loop stops."""
    if budget.expired():
        log.write(f"deadline reached at step {step}")
        return True
    return False


def apply_smoke_sizes(args: argparse.Namespace, pool: bool) -> None:
    """``--smoke`` of the distillation scripts: 3 steps of 2 scenes of 64 px, a checkpoint and an
    evaluation (of 2 scenes) every 2 steps; with ``pool``, a 4-scene latent pool."""
    args.steps, args.batch, args.size = 3, 2, 64
    if pool:
        args.pool = 4
    args.warmup, args.ckpt_every, args.eval_every, args.eval_count = 1, 2, 2, 2


def add_run_options(p: argparse.ArgumentParser, threads: int = 1) -> None:
    """The options a training script's command line ends with: ``--seed`` (0), ``--threads``
    (``threads``), ``--resume`` and ``--smoke``."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=threads)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--smoke", action="store_true")
