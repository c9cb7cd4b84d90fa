"""The ``"onnx"`` backend: its runner (:mod:`.runner`, plain UNet calls on ONNX Runtime) and its
export (:mod:`.export`, UNet → ONNX: ``gnr-fast export onnx``, and the runner's lazy exports)."""
