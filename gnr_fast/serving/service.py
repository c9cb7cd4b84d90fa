"""The edit service behind the Triton models: request validation, the inversion cache, batching.

Transport-free: :mod:`gnr_fast.serving.server` (pytriton) and the standalone Python-backend
``model.py`` (:mod:`gnr_fast.serving.triton_repo`) both call it. Two ways in:

* :meth:`EditService.run` — process a list of validated jobs now, sharing UNet calls between
  compatible edits (Triton's own dynamic batcher hands the standalone model such lists);
* :meth:`EditService.submit` — queue one job for the engine thread, which gathers up to
  ``max_batch`` compatible edits, waiting at most ``max_queue_delay_ms`` after the first
  (the pytriton server, whose instances each hold one request).

Every engine call (inversion, edit, prompt encoding) happens on one thread at a time: the UNet's
capture hooks and the editor's embedding cache are not thread-safe, and batching — not
concurrency — is what shares the work. A job's failure (bad input, non-finite guidance) is that
job's error only; it is reported, never retried.
"""

from __future__ import annotations

import io
import json
import logging
import math
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..batch import BatchRequest, edit_batch
from ..config import ALL_PRESET_NAMES, EditConfig
from ..devices import on_device, retry_on_oom
from ..editor import Editor
from ..errors import (
    ConfigError,
    GnrError,
    InputError,
    RequestTimeoutError,
    ServiceBusyError,
    ServiceShuttingDownError,
)
from ..images import PreparedImage, prepare_image
from ..inversion import Inversion
from ..prompts import check_prompt
from ..results import EditResult
from .cache import InversionCache, InversionKey

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 2000
"""Longer prompts are refused before tokenizing (CLIP reads 77 tokens, a few hundred characters)."""

MAX_IMAGE_BYTES = 32 * 1024**2
"""Default largest encoded image accepted (a 1024² PNG is a few MB); ``ServiceConfig.max_image_bytes``."""

MAX_CONFIG_BYTES = 64 * 1024
"""Longest config JSON accepted (the authors' configs are about 1 KB; a 50-step schedule list per
guider stays far below this)."""

MAX_CONFIG_DEPTH = 16
"""Deepest nesting of a config's JSON (the authors' format nests 4 levels)."""


@dataclass(frozen=True)
class ServiceConfig:
    """Limits and batching of the edit service."""

    max_batch: int = 4  # most edits sharing UNet calls
    max_queue_delay_ms: float = 20.0  # longest wait for more edits after the first of a batch
    cache_mb: float = 1024.0  # inversion cache budget (trajectories + source-pass internals)
    default_steps: int = 50  # steps of a request that names none
    max_steps: int = 200  # more steps are refused as absurd (the paper uses 50)
    max_queue: int = 64  # queued jobs beyond which requests are refused as busy
    request_timeout_s: float = 600.0  # a request waiting longer is answered with an error (and not run)
    max_image_bytes: int = MAX_IMAGE_BYTES  # largest encoded image of a request
    torch_threads: int | None = None  # intra-op threads of the engine thread; None: torch's setting

    def __post_init__(self) -> None:
        optional = ("torch_threads",) if self.torch_threads is not None else ()
        for name in ("max_batch", "default_steps", "max_steps", "max_queue", "max_image_bytes", *optional):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_queue_delay_ms", "cache_mb", "request_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
        if self.default_steps > self.max_steps:
            raise ConfigError(f"default_steps ({self.default_steps}) exceeds max_steps ({self.max_steps})")


@dataclass(eq=False)
class Job:
    """A validated request: an inversion to look up or compute, and for edits the edit to run."""

    image: PreparedImage
    key: InversionKey
    config: EditConfig | None = None  # None: an inversion-only job
    target_prompt: str | None = None
    received: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)

    @property
    def is_edit(self) -> bool:
        return self.config is not None

    @property
    def group(self) -> tuple:
        """Edits with equal groups share UNet calls (same config and working size)."""
        return (self.config, self.key.working_size)


@dataclass
class Outcome:
    """What a job produced: the edit (None for inversion jobs), its inversion and timings."""

    inversion: Inversion
    cache_hit: bool
    result: EditResult | None = None
    queue_s: float = 0.0
    inversion_s: float = 0.0
    inversion_batch: int = 0  # images inverted together with this job's (0: cache hit)

    @property
    def batch_size(self) -> int:
        """How many edits shared this edit's UNet calls (0 for an inversion job)."""
        return self.result.batch_size if self.result is not None else 0

    def info(self, job: Job) -> dict[str, Any]:
        """The JSON-ready report returned beside the image."""
        timings = {"queue_s": self.queue_s, "inversion_s": self.inversion_s}
        info: dict[str, Any] = {
            "cache_hit": self.cache_hit,
            "num_steps": self.inversion.num_steps,
            "working_size": list(self.inversion.working_size),
            "model_id": self.inversion.model_id,
            "content_hash": self.inversion.content_hash,
            "inversion_batch": self.inversion_batch,
        }
        if self.result is not None:
            timings.update(editing_s=self.result.timings.editing_s, decoding_s=self.result.timings.decoding_s)
            info.update(batch_size=self.result.batch_size, unet_calls=self.result.unet_calls,
                        unet_rows=self.result.unet_rows)
        timings["total_s"] = time.perf_counter() - job.received
        info["timings"] = {k: round(v, 6) for k, v in timings.items()}
        return info


class EditService:
    """Validates requests and runs them on one editor with a shared inversion cache."""

    def __init__(self, editor: Editor, config: ServiceConfig | None = None) -> None:
        self.editor = editor
        self.config = config or ServiceConfig()
        # a request naming no steps: the model's own count (a consistency model's 4), else the server's
        self.default_steps = editor.default_steps if editor.default_steps is not None else self.config.default_steps
        self.cache = InversionCache(int(self.config.cache_mb * 1024**2))
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._held: deque[Job] = deque()  # jobs taken while gathering a batch they did not fit
        self._engine_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    # --- validation (any thread) ----------------------------------------------------------

    def edit_job(
        self,
        image: bytes,
        source_prompt: str | bytes,
        target_prompt: str | bytes,
        preset: str | bytes | None = None,
        config_json: str | bytes | None = None,
        steps: int | None = None,
    ) -> Job:
        """Validate an edit request; raises :class:`InputError`/:class:`ConfigError` naming the bad field."""
        source = _text(source_prompt, "source_prompt")
        target = _text(target_prompt, "target_prompt")
        steps = self._steps(steps)
        preset_name = None if preset is None else _text(preset, "preset", allow_empty=True) or None
        if preset_name is not None and preset_name not in ALL_PRESET_NAMES:
            raise ConfigError(f"preset {preset_name!r} is unknown; choose one of {list(ALL_PRESET_NAMES)}")
        config = self._config(preset_name, config_json, steps)
        prepared = self._image(image)
        return Job(prepared, self._key(prepared, source, config.num_steps), config=config, target_prompt=target)

    def invert_job(self, image: bytes, source_prompt: str | bytes, steps: int | None = None) -> Job:
        """Validate an inversion request."""
        source = _text(source_prompt, "source_prompt")
        steps = self.default_steps if steps is None else self._steps(steps)
        prepared = self._image(image)
        return Job(prepared, self._key(prepared, source, steps))

    def _steps(self, steps: object) -> int | None:
        if steps is None:
            return None
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.config.max_steps:
            raise InputError(f"steps must be an integer in [1, {self.config.max_steps}], got {steps!r}")
        return steps

    def _config(self, preset: str | None, config_json: str | bytes | None, steps: int | None) -> EditConfig:
        if config_json is None or not _text(config_json, "config", allow_empty=True, limit=MAX_CONFIG_BYTES).strip():
            config = self.editor.resolve_config(preset, num_steps=self.default_steps if steps is None else steps)
        else:
            config = self.editor.resolve_config(config=EditConfig.from_dict(parse_config_json(config_json)), num_steps=steps)
        if config.num_steps > self.config.max_steps:
            raise InputError(f"the config runs {config.num_steps} steps; this server allows at most {self.config.max_steps}")
        self.editor.sampler_for(config)  # a config the model's sampler cannot run: ConfigError now
        return config

    def _image(self, image: object) -> PreparedImage:
        if not isinstance(image, (bytes, bytearray)):
            raise InputError(f"image must be encoded image bytes (PNG/JPEG), got {type(image).__name__}")
        if not image:
            raise InputError("image is empty; send the bytes of a PNG or JPEG file")
        if len(image) > self.config.max_image_bytes:
            raise InputError(
                f"image is {len(image)} bytes; this server's limit is {self.config.max_image_bytes} bytes (--max-image-mb)"
            )
        return prepare_image(bytes(image), max_pixels=self.editor.max_pixels)

    def _key(self, image: PreparedImage, source_prompt: str, num_steps: int) -> InversionKey:
        return InversionKey(image.content_hash, source_prompt, self.editor.model_id, num_steps, image.working_size)

    # --- running (one engine thread at a time) ---------------------------------------------

    def run(self, jobs: list[Job]) -> list[Outcome | GnrError]:
        """Run ``jobs`` now: inversions from the cache or computed, then all edits in one batch."""
        # The current CUDA device is per thread: make the editor's the current one wherever this runs.
        with self._engine_lock, on_device(self.editor.components.device):
            return self._run(jobs)

    def _run(self, jobs: list[Job]) -> list[Outcome | GnrError]:
        started = time.perf_counter()
        outcomes: list[Outcome | GnrError | None] = [None] * len(jobs)
        missing: dict[InversionKey, list[int]] = {}  # new inversions, each shared by its jobs
        for i, job in enumerate(jobs):
            try:
                if job.is_edit:
                    self._check_tokens(job.target_prompt, "target_prompt")
                inversion = self.cache.get(job.key)
                if inversion is not None:
                    outcomes[i] = Outcome(inversion, cache_hit=True, queue_s=started - job.received)
                else:
                    self._check_tokens(job.key.source_prompt, "source_prompt")
                    missing.setdefault(job.key, []).append(i)
            except GnrError as exc:
                outcomes[i] = exc
        self._invert_missing(jobs, missing, outcomes, started)
        edits = [i for i, (job, out) in enumerate(zip(jobs, outcomes)) if job.is_edit and isinstance(out, Outcome)]
        if edits:
            requests = [BatchRequest(outcomes[i].inversion, jobs[i].target_prompt, config=jobs[i].config) for i in edits]
            results = retry_on_oom(
                lambda batch: edit_batch(self.editor, batch, return_exceptions=True),
                requests,
                self.editor.components.device,
                drop_caches=lambda: _drop_source_caches(requests),
                describe=lambda request: f"the edit toward {request.target_prompt!r}",
            )
            for i, result in zip(edits, results):
                self.cache.refresh(jobs[i].key)  # the edit filled the inversion's source cache
                if isinstance(result, GnrError):
                    logger.warning("edit failed: %s", result)
                    outcomes[i] = result
                else:
                    outcomes[i].result = result  # result.batch_size: the edits that shared its UNet calls
        return outcomes

    def _invert_missing(
        self, jobs: list[Job], missing: dict[InversionKey, list[int]], outcomes: list, started: float
    ) -> None:
        """Compute (and cache) the missing inversions, those of one step count together (images of
        one working size share UNet calls); fill the outcomes of every job that needs them."""
        groups: dict[int, list[InversionKey]] = {}
        for key in missing:
            groups.setdefault(key.num_steps, []).append(key)
        for num_steps, keys in groups.items():
            firsts = [jobs[missing[key][0]] for key in keys]
            start = time.perf_counter()
            try:
                inversions = self.editor.invert_prepared(
                    [job.image for job in firsts], [key.source_prompt for key in keys], num_steps
                )
            except GnrError as exc:
                for key in keys:
                    for i in missing[key]:
                        outcomes[i] = exc
                continue
            seconds = time.perf_counter() - start
            for key, inversion in zip(keys, inversions):
                self.cache.put(key, inversion)
                for i in missing[key]:
                    outcomes[i] = Outcome(
                        inversion, cache_hit=False, queue_s=started - jobs[i].received, inversion_s=seconds,
                        inversion_batch=sum(k.working_size == key.working_size for k in keys),
                    )

    def _check_tokens(self, prompt: str, name: str) -> None:
        """Refuse a prompt longer than the text encoder's context (a library edit would truncate it)."""
        tokenizer = self.editor.components.tokenizer
        count = len(tokenizer(prompt, truncation=False).input_ids)
        if count > tokenizer.model_max_length:
            raise InputError(
                f"{name} is {count} tokens long; the text encoder reads at most {tokenizer.model_max_length} "
                "(including start and end tokens); shorten it"
            )

    # --- the queue (pytriton server) -------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread that serves :meth:`submit`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve_queue, name="gnr-engine", daemon=True)
            self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Jobs submitted and not yet taken by the engine thread (approximate while it gathers a batch)."""
        return self._queue.qsize() + len(self._held)

    def submit(self, job: Job) -> Future:
        """Queue ``job``; its future resolves to an :class:`Outcome` or raises the job's error."""
        if self._closing.is_set():
            raise ServiceShuttingDownError("the server is shutting down; retry on another instance")
        if self._queue.qsize() >= self.config.max_queue:
            raise ServiceBusyError(f"the server has {self.config.max_queue} requests queued; retry later")
        self._queue.put(job)
        return job.future

    def wait(self, job: Job) -> Outcome:
        """Submit ``job`` and wait for it (at most ``request_timeout_s``).

        A job that times out before the engine thread took it is cancelled, so no work runs for a
        caller that is gone; one already running finishes (a batch's UNet calls cannot drop a row)
        and its result is discarded.
        """
        future = self.submit(job)
        try:
            return future.result(timeout=self.config.request_timeout_s)
        except TimeoutError as exc:
            state = "it was cancelled before it ran" if future.cancel() else "its result will be discarded"
            raise RequestTimeoutError(
                f"the request did not finish within {self.config.request_timeout_s:g}s ({state}); the server is overloaded"
            ) from exc

    def begin_shutdown(self) -> None:
        """Refuse every later :meth:`submit` with a "shutting down" :class:`ServiceBusyError`; jobs
        already submitted still run (:meth:`close` waits for them)."""
        self._closing.set()

    def close(self, timeout_s: float = 60.0) -> None:
        """Refuse new jobs, finish the submitted ones, then stop the engine thread."""
        self.begin_shutdown()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout_s)
            self._thread = None

    def _serve_queue(self) -> None:
        if self.config.torch_threads is not None:
            torch.set_num_threads(self.config.torch_threads)  # per thread under OpenMP: set where the work runs
        while True:
            job = self._held.popleft() if self._held else self._queue.get()
            if job is None:
                return
            batch = self._gather(job) if job.is_edit else [job]
            batch = [job_ for job_ in batch if job_.future.set_running_or_notify_cancel()]  # drop timed-out jobs
            if not batch:
                continue
            try:
                outcomes = self.run(batch)
            except Exception as exc:  # a bug, not a user error: report it to each waiting client, keep serving
                logger.exception("engine failure on a batch of %d", len(batch))
                outcomes = [exc] * len(batch)
            for job_, outcome in zip(batch, outcomes):
                if isinstance(outcome, BaseException):
                    job_.future.set_exception(outcome)
                else:
                    job_.future.set_result(outcome)

    def _gather(self, first: Job) -> list[Job]:
        """``first`` and the compatible edits that arrive within the queue delay (up to ``max_batch``)."""
        batch = [first]
        for held in list(self._held):
            if len(batch) < self.config.max_batch and held is not None and held.is_edit and held.group == first.group:
                self._held.remove(held)
                batch.append(held)
        deadline = first.received + self.config.max_queue_delay_ms / 1000
        while len(batch) < self.config.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if job is not None and job.is_edit and job.group == first.group:
                batch.append(job)
            else:
                self._held.append(job)
                if job is None:
                    break
        return batch


def parse_config_json(text: str | bytes) -> dict:
    """The JSON object of a request's config; raises :class:`ConfigError` for anything else: not
    UTF-8, longer than :data:`MAX_CONFIG_BYTES`, not JSON, nested deeper than :data:`MAX_CONFIG_DEPTH`
    (checked before parsing, so no deep recursion), or not an object."""
    size = len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config is {size} bytes; the limit is {MAX_CONFIG_BYTES} bytes")
    text = _text(text, "config", allow_empty=True, limit=MAX_CONFIG_BYTES)
    depth = _json_depth(text)
    if depth > MAX_CONFIG_DEPTH:
        raise ConfigError(f"config nests {depth} levels deep; the limit is {MAX_CONFIG_DEPTH}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config is not valid JSON: {exc}; send the authors' config format as a JSON object") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a JSON object with a 'guiders' list, got {type(data).__name__}")
    return data


def _json_depth(text: str) -> int:
    """The deepest bracket nesting of JSON ``text`` (brackets inside strings not counted)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _text(value: object, name: str, allow_empty: bool = False, limit: int = MAX_PROMPT_CHARS) -> str:
    """A request's text field as a string: UTF-8 without NUL or other control characters (tab and
    newlines excepted), at most ``limit`` characters, non-empty unless allowed."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{name} is not valid UTF-8 text: {exc}") from exc
    if not isinstance(value, str):
        raise InputError(f"{name} must be text, got {type(value).__name__}")
    if len(value) > limit:
        raise InputError(f"{name} is {len(value)} characters long; the limit is {limit}")
    bad = next((c for c in value if (ord(c) < 32 and c not in "\t\n\r") or ord(c) == 127 or 0xD800 <= ord(c) < 0xE000), None)
    if bad is not None:
        raise InputError(f"{name} contains the control character {bad!r}; send plain text")
    if not allow_empty:
        check_prompt(value, name)
    return value


def encode_png(image) -> bytes:
    """PNG bytes of a PIL image."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _drop_source_caches(requests: list[BatchRequest]) -> None:
    """Free the source-pass caches of the requests' inversions (rebuilt by their next edit)."""
    for request in requests:
        request.source.source_cache = None
