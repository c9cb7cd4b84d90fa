"""Image reading, normalisation and the resize policy."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from gnr_fast.errors import InputError
from gnr_fast.images import prepare_image, read_image, to_output_image, working_size


def test_multiple_of_64_used_as_is(sample_image):
    prepared = prepare_image(sample_image)
    assert prepared.working_size == (64, 64) and not prepared.resized
    expected = np.asarray(sample_image, np.float32) / 127.5 - 1
    np.testing.assert_allclose(prepared.pixels[0].permute(1, 2, 0).numpy(), expected, rtol=0, atol=1e-6)


def test_normalisation_has_the_reference_torch_bits():
    rgb = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    reference = torch.from_numpy(rgb.copy()).float() / 127.5 - 1  # the reference's formula
    prepared = prepare_image(Image.fromarray(rgb))
    assert prepared.pixels.dtype == torch.float32
    assert torch.equal(prepared.pixels[0].permute(1, 2, 0), reference)


def test_other_sizes_snap_to_nearest_multiple_and_come_back():
    assert working_size(100, 70) == (128, 64)
    assert working_size(64, 95) == (64, 64) and working_size(64, 97) == (64, 128)
    img = Image.new("RGB", (100, 70), (10, 200, 30))
    prepared = prepare_image(img)
    assert prepared.pixels.shape == (1, 3, 64, 128) and prepared.original_size == (100, 70)
    assert to_output_image(np.zeros((64, 128, 3), np.uint8), prepared.original_size).size == (100, 70)


def test_rgba_composited_over_white_and_grey_expanded():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    assert read_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    grey = Image.new("L", (64, 64), 77)
    assert read_image(grey).getpixel((3, 3)) == (77, 77, 77)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (128, 64), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 64, 64))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    shown = read_image(path)
    assert shown.size == (64, 128)
    assert shown.getpixel((32, 10))[0] > 200  # the white half is on top after rotation


def test_arrays_and_bytes(sample_image):
    arr = np.asarray(sample_image)
    assert read_image(arr).size == (64, 64)
    assert read_image(arr.astype(np.float32) / 255).getpixel((0, 0)) == sample_image.getpixel((0, 0))
    buf = io.BytesIO()
    sample_image.save(buf, format="WEBP", lossless=True)
    assert read_image(buf.getvalue()).getpixel((0, 0)) == sample_image.getpixel((0, 0))


def test_content_hash_depends_on_pixels(sample_image):
    other = sample_image.copy()
    other.putpixel((0, 0), (0, 0, 0))
    assert prepare_image(sample_image).content_hash != prepare_image(other).content_hash
    assert prepare_image(sample_image).content_hash == prepare_image(sample_image.copy()).content_hash


@pytest.mark.parametrize(
    "image, match",
    [
        ("/no/such/file.png", "does not exist"),
        (b"not an image", "cannot read"),
        (Image.new("RGB", (63, 200)), "at least 64"),
        (np.zeros((64, 64, 2), np.uint8), "HxW"),
        (np.full((64, 64, 3), np.nan, np.float32), "NaN"),
        (np.zeros((64, 64, 3), np.int64), "uint8 or float"),
        (12, "file path, PIL image"),
    ],
)
def test_bad_images(image, match):
    with pytest.raises(InputError, match=match):
        prepare_image(image)


def test_too_large_image_has_configurable_limit():
    img = Image.new("RGB", (256, 256))
    with pytest.raises(InputError, match="above the limit"):
        prepare_image(img, max_pixels=128 * 128)
    assert prepare_image(img, max_pixels=256 * 256).working_size == (256, 256)


def test_corrupt_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InputError, match="cannot read"):
        prepare_image(path)
