"""Every Triton launch the ops make compiles for A100 (sm_80), L4 (sm_89) and H100 (sm_90) within each
GPU's shared-memory and register limits (benchmarks/kernel_resources.py; compiled here without a GPU,
in a child process, since this one interprets Triton)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNELS = {"_attention_lse_fwd_kernel", "_attn_map_energy_fwd_kernel", "_attn_map_energy_bwd_dq_kernel",
           "_attn_map_energy_bwd_dk_kernel", "_feature_energy_kernel", "_rescale_gamma_kernel"}


def compiling_python(*args: str) -> subprocess.CompletedProcess:
    """This Python run with ``args`` from the repository root, Triton compiling (not interpreting)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                          check=False)


def test_every_launch_fits_every_target(tmp_path):
    out = tmp_path / "resources.json"
    result = compiling_python("benchmarks/kernel_resources.py", "--arch", "80", "89", "90", "--json", str(out))
    assert out.is_file(), result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["launch"] for r in rows if not r["fits"]] == [], result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    assert {r["kernel"] for r in rows} == KERNELS
    per_arch = {arch: [r["launch"] for r in rows if r["arch"] == arch] for arch in (80, 89, 90)}
    assert per_arch[80] == per_arch[89] == per_arch[90] and len(per_arch[90]) >= 60  # measured 69 distinct launches
    for dtype in ("fp32", "fp16", "bf16"):
        assert sum(r["inputs"] == dtype for r in rows if r["arch"] == 90) >= 20, dtype  # measured 23 each
    assert max(r["registers"] for r in rows) <= 255


def test_a_launch_over_the_shared_memory_limit_is_reported():
    """The check can fail: float32 attention at head dim 256 with 16 × 32 tiles and three stages (the
    configuration before this check: 164 KiB) needs more shared memory than an L4 (sm_89) block may have."""
    code = """
import dataclasses, json, sys
sys.path.insert(0, "benchmarks")
import kernel_resources as kr
launch = next(l for l in kr.record_launches() if l.kernel == "_attention_lse_fwd_kernel"
              and dict(l.signature)["Q"] == "*fp32" and dict(l.constexprs)["BLOCK_D"] == 256)
big = dataclasses.replace(launch, constexprs=tuple((dict(launch.constexprs) | {"BLOCK_M": 16, "BLOCK_N": 32}).items()),
                          options=(("num_stages", 3), ("num_warps", 4)))
print(json.dumps(kr.compile_launch(big, 89)))
"""
    result = compiling_python("-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert not row["fits"] and "shared memory" in row["why_not"] and row["shared_bytes"] > 101376
