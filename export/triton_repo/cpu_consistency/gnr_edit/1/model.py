"""gnr-fast edit model for Triton's Python backend (written by `gnr-fast export triton-repo`)."""

from gnr_fast.serving.triton_repo import TritonPythonModel  # noqa: F401
