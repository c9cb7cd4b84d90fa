"""The ``"tensorrt"`` backend: its runner (:mod:`.runner`, plain UNet calls on a TensorRT engine) and
its engine (:mod:`.engine`: availability, optimisation profiles, the engine record and
``gnr-fast export tensorrt``, built from an ONNX export of :mod:`gnr_fast.runtime.onnx.export`)."""
