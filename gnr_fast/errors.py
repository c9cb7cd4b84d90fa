"""Exception hierarchy of gnr-fast.

Every error a user can cause derives from :class:`GnrError`; its message names the argument or
path, the bad value, and the fix. The CLI and the server turn these into one-line messages.
"""

from __future__ import annotations


class GnrError(Exception):
    """Base class for every error gnr-fast raises on purpose."""


class ConfigError(GnrError, ValueError):
    """An edit configuration (preset, YAML, scales, schedules) is invalid."""


class InputError(GnrError, ValueError):
    """A user input (image, prompt, step count, inversion file) is invalid."""


class ModelLoadError(GnrError):
    """A checkpoint cannot be loaded."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model path does not exist."""


class NotAPipelineError(ModelLoadError):
    """The path exists but is not a diffusers Stable Diffusion pipeline folder."""


class MissingComponentError(ModelLoadError):
    """A pipeline component folder, its config or its weights are missing."""


class UnsupportedArchitectureError(ModelLoadError):
    """The checkpoint is not a Stable Diffusion 1.x/2.x model (e.g. SDXL)."""


class CorruptCheckpointError(ModelLoadError):
    """A single-file checkpoint is truncated or corrupt, or holds objects other than tensors."""


class NotACheckpointError(NotAPipelineError):
    """A file is readable but is not a Stable Diffusion single-file checkpoint (nor a pipeline folder)."""


class InversionMismatchError(InputError):
    """A saved inversion does not belong to the model or settings it is used with."""


class BackendUnavailableError(GnrError, RuntimeError):
    """An optional runtime backend (Triton, ONNX Runtime, TensorRT, CUDA) is not available here."""


class ExportError(GnrError, RuntimeError):
    """Exporting a model or a server repository failed."""


class ExportMismatchError(ExportError):
    """An exported UNet (ONNX file, TensorRT engine) was made from another checkpoint, dtype or size."""


class GuidanceError(GnrError, RuntimeError):
    """Guidance produced non-finite values during an edit (reported, never retried silently)."""


class NonFiniteError(GnrError, RuntimeError):
    """A model component produced NaN or infinite values even in float32 (never written out as an image)."""


class DeviceOutOfMemoryError(GnrError, RuntimeError):
    """A job does not fit in the device's memory even when run on its own."""


class ServiceBusyError(GnrError, RuntimeError):
    """The edit service's queue is full or it is shutting down; the client may try again later."""


class ServiceShuttingDownError(ServiceBusyError):
    """The edit service is shutting down (SIGTERM) and accepts no new request; another replica may."""


class RequestTimeoutError(ServiceBusyError):
    """A request waited longer than the server's request timeout; the server is overloaded."""


class ServerError(GnrError, RuntimeError):
    """A gnr-fast server could not be reached or answered with an error that is not a gnr-fast error."""


class ReplicaUnavailableError(ServerError):
    """No answer from the replica: it could not be reached, dropped the connection (e.g. it died),
    or a load balancer in front of it answered 502/503/504. The same request may go to another replica."""
