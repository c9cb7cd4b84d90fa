"""Hand-built hostile image files: valid headers that lie, in the byte formats the decoders read."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int, rows: int = 4) -> bytes:
    """A PNG whose IHDR declares ``width`` × ``height`` RGB but whose IDAT holds only ``rows`` rows
    (a few KB on disk; decoding it in full would need width × height × 3 bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = (b"\x00" + b"\x00" * (3 * width)) * rows
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def png_bomb(width: int, height: int) -> bytes:
    """A complete, valid all-black PNG of ``width`` × ``height`` (zlib makes zeros tiny), built row-streamed."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # greyscale: 1 byte per pixel
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def webp_declaring(width: int, height: int) -> bytes:
    """A lossless WebP of 64×64 whose VP8L header is patched to declare ``width`` × ``height`` (≤ 16384)."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buffer, format="WEBP", lossless=True)
    data = bytearray(buffer.getvalue())
    at = data.index(b"VP8L") + 8  # chunk header: fourcc + size
    assert data[at] == 0x2F, "expected a VP8L signature byte"
    bits = int.from_bytes(data[at + 1 : at + 5], "little")
    bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    data[at + 1 : at + 5] = bits.to_bytes(4, "little")
    return bytes(data)


def png_with_text(text_bytes: int, compressed: bool = True) -> bytes:
    """A valid 64×64 PNG carrying one text chunk that inflates to ``text_bytes`` bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="PNG")
    data = buffer.getvalue()
    payload = b"x" * text_bytes
    chunk = _chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(payload, 9)) if compressed else _chunk(
        b"tEXt", b"Comment\x00" + payload
    )
    at = data.index(b"IDAT") - 4
    return data[:at] + chunk + data[at:]


def animated_png(colours: list[tuple[int, int, int]], size: tuple[int, int] = (64, 64)) -> bytes:
    frames = [Image.new("RGB", size, colour) for colour in colours]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


def encoded(size: tuple[int, int] = (64, 64), fmt: str = "PNG", seed: int = 0) -> bytes:
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()
