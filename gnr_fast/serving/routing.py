"""Image-affine routing: the key a load balancer hashes so that every edit of an image reaches the
replica whose cache holds its inversion.

Each replica caches inversions by :class:`~gnr_fast.serving.cache.InversionKey`: the hash of the
image's RGB pixels (:func:`~gnr_fast.images.pixel_hash`), the source prompt, the model id, the
steps and the working size. The client computes :func:`route_key` from the same pixels hash, source
prompt and steps and sends it as the HTTP header (gRPC metadata) :data:`ROUTE_HEADER`; a stock
balancer hashes it consistently (``export/nginx``: ``hash $http_x_gnr_route_key consistent``), so
requests with one inversion key always meet one replica while it lives.

What the key leaves out, and why:

* the model id — the client cannot know it before asking, and a balancer's upstream group serves
  one model (replicas of one deployment); serve different models behind different groups;
* the working size — a function of the pixels under the server's resize policy, which every
  replica of a group shares;
* the server's default steps — a request without ``steps`` is keyed ``default``; all replicas of a
  group are started with the same ``--steps``. A request naming the default explicitly gets
  another key than one naming none: send steps always or never for one image, or its edits may
  be split between two replicas (each then inverts it once).

Two requests with the same inversion key therefore get the same route key; the converse is not
needed (requests that share a route key but not an inversion key merely meet on one replica).
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..images import DEFAULT_MAX_PIXELS, ImageInput, pixel_hash, read_image

ROUTE_HEADER = "x-gnr-route-key"
"""HTTP header / gRPC metadata key carrying :func:`route_key` (lower case: gRPC metadata keys are)."""


def route_key(image: ImageInput, source_prompt: str, steps: int | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """The routing key of an edit or inversion of ``image`` described by ``source_prompt``.

    Decodes ``image`` like the server does (:func:`~gnr_fast.images.read_image`): an image the server
    would refuse as unreadable or larger than ``max_pixels`` raises the same
    :class:`~gnr_fast.errors.InputError` here.
    """
    pixels = pixel_hash(np.asarray(read_image(image, max_pixels), dtype=np.uint8))
    steps_part = "default" if steps is None else str(int(steps))
    text = "\x1f".join(("gnr-route-v1", pixels, source_prompt, steps_part))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def retry_key(key: str, attempt: int) -> str:
    """The route key of retry ``attempt`` (0: the first try): another point of the balancer's hash
    ring, so that a retry behind a balancer meets (usually) another replica than the one that refused."""
    return key if attempt == 0 else f"{key}.{attempt}"
