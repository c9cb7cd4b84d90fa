# Sourced by .ci/run and .ci/run-slow after the virtual environment exists: the settings that make a
# broken machine fail CI instead of skipping tests, and the inductor cache kept across CI runs.
# Triton picks interpreted or GPU kernels at its first import: interpret on a machine without a GPU.
if ! .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export TRITON_INTERPRET=1
fi
# The native ops must have been built by the install command (tests/kernels/test_native_ops.py).
export GNR_FAST_REQUIRE_NATIVE=1
# Only the skips of the allow-list in tests/skip_policy.py (no CUDA GPU, no TensorRT, no AVX-512 / native
# bfloat16 CPU) may pass; any other skip fails the run.
export GNR_FAST_STRICT_SKIPS=1
# Inductor's on-disk cache: a machine that keeps $HOME between runs compiles the CI graphs cold once.
export GNR_TEST_INDUCTOR_CACHE="${GNR_TEST_INDUCTOR_CACHE:-$HOME/.cache/gnr-fast-ci/inductor}"
mkdir -p "$GNR_TEST_INDUCTOR_CACHE"
# Every pinned [test] package installed, and the golden data present.
.venv/bin/python .ci/preflight.py
