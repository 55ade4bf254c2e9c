"""Image loading: every mode becomes RGB uint8 with the right values; every bad file its own clear error."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from eagle import images
from eagle.images import ImageError, TruncatedImageError, list_images, load_image

LIMIT = 64_000_000


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width×height 8-bit RGB pixels (one empty IDAT)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )


def random_rgb(height: int = 32, width: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def assert_one_line_error(source, needle: str, *, name: str | None = None, max_pixels: int = LIMIT) -> str:
    with pytest.raises(ImageError) as caught:
        load_image(source, max_pixels=max_pixels, name=name)
    message = str(caught.value)
    assert "\n" not in message
    assert needle in message, message
    return message


# ----------------------------------------------------------------------------- good inputs, exact values


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_round_trip_exactly(fmt):
    rgb = random_rgb()
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    decoded = load_image(encode(Image.fromarray(rgb), fmt, **kwargs), max_pixels=LIMIT)
    assert decoded.dtype == np.uint8 and decoded.shape == (32, 48, 3)
    assert np.array_equal(decoded, rgb)


def test_jpeg_decodes_close_to_the_original(tmp_path):
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :24] = (200, 30, 30)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    decoded = load_image(path, max_pixels=LIMIT)
    assert decoded.shape == (32, 48, 3)
    assert np.abs(decoded.astype(int) - rgb).mean() < 3


def test_grayscale_is_replicated_to_three_channels():
    gray = np.random.default_rng(1).integers(0, 256, size=(20, 30), dtype=np.uint8)
    decoded = load_image(encode(Image.fromarray(gray)), max_pixels=LIMIT)
    assert decoded.shape == (20, 30, 3)
    for channel in range(3):
        assert np.array_equal(decoded[..., channel], gray)


def test_one_bit_image_becomes_black_and_white():
    bits = Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1")
    decoded = load_image(encode(bits), max_pixels=LIMIT)
    assert decoded[..., 0].tolist() == [[0, 255], [255, 0]]


def test_palette_image_is_expanded_through_its_palette():
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:, :3] = (10, 200, 30)
    rgb[:, 3:] = (250, 5, 100)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
    assert palette.mode == "P"
    assert np.array_equal(load_image(encode(palette), max_pixels=LIMIT), rgb)


def test_palette_transparency_is_composited_on_white():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 1)
    data = encode(palette, transparency=0)
    decoded = load_image(data, max_pixels=LIMIT)
    assert decoded[0, 0].tolist() == [0, 0, 255]
    assert decoded[1, 1].tolist() == [255, 255, 255]


def test_rgba_is_composited_on_white():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (200, 100, 0)
    rgba[..., 3] = [[255, 0, 128], [255, 255, 255]]
    decoded = load_image(encode(Image.fromarray(rgba, "RGBA")), max_pixels=LIMIT)
    assert decoded[0, 0].tolist() == [200, 100, 0]  # opaque: unchanged
    assert decoded[0, 1].tolist() == [255, 255, 255]  # transparent: white
    a = 128 / 255
    expected = np.rint(np.array([200, 100, 0]) * a + 255 * (1 - a)).astype(int).tolist()
    assert decoded[0, 2].tolist() == expected


def test_gray_with_alpha_is_composited_on_white():
    la = Image.fromarray(
        np.stack([np.full((2, 2), 50, np.uint8), np.array([[0, 255], [255, 255]], np.uint8)], -1), "LA"
    )
    decoded = load_image(encode(la), max_pixels=LIMIT)
    assert decoded[0, 0].tolist() == [255, 255, 255] and decoded[0, 1].tolist() == [50, 50, 50]


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 300, 257 * 100], [32896, 65535, 1000]], np.uint16)
    path = tmp_path / "gray16.png"
    assert cv2.imwrite(str(path), values)
    assert Image.open(path).mode.startswith("I")
    decoded = load_image(path, max_pixels=LIMIT)
    expected = np.rint(values / 257.0).astype(np.uint8)  # clipping would turn 300 and 1000 into 255
    assert decoded[..., 0].tolist() == expected.tolist() == [[0, 1, 100], [128, 255, 4]]
    assert np.array_equal(decoded[..., 1], decoded[..., 0])


def test_16bit_colour_png_keeps_all_bits_and_is_scaled(tmp_path):
    rgb16 = np.random.default_rng(2).integers(0, 65536, size=(5, 7, 3), dtype=np.uint16)
    rgb16[0, 0] = (300, 32896, 65535)
    path = tmp_path / "rgb16.png"
    assert cv2.imwrite(str(path), rgb16[..., ::-1])  # OpenCV writes BGR
    decoded = load_image(path, max_pixels=LIMIT)
    assert np.array_equal(decoded, np.rint(rgb16 / 257.0).astype(np.uint8))
    assert decoded[0, 0].tolist() == [1, 128, 255]


def test_16bit_rgba_png_is_scaled_and_composited(tmp_path):
    bgra = np.zeros((2, 2, 4), np.uint16)
    bgra[..., 2] = 65535  # red
    bgra[..., 3] = [[65535, 0], [65535, 65535]]
    path = tmp_path / "rgba16.png"
    assert cv2.imwrite(str(path), bgra)
    decoded = load_image(path, max_pixels=LIMIT)
    assert decoded[0, 0].tolist() == [255, 0, 0] and decoded[0, 1].tolist() == [255, 255, 255]


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in CMYK
    decoded = load_image(encode(cmyk, "JPEG", quality=100), max_pixels=LIMIT)
    assert decoded.shape == (8, 8, 3)
    assert decoded[4, 4, 0] > 200 and decoded[4, 4, 1] < 60 and decoded[4, 4, 2] < 60


def test_exif_orientation_is_applied():
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30] = (255, 0, 0)  # left half red
    rgb[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    decoded = load_image(encode(Image.fromarray(rgb), "JPEG", quality=95, exif=exif), max_pixels=LIMIT)
    assert decoded.shape == (60, 40, 3)
    assert decoded[5, 20, 0] > 200 and decoded[5, 20, 2] < 60  # left became top: red
    assert decoded[55, 20, 2] > 200 and decoded[55, 20, 0] < 60


def test_two_by_two_is_the_smallest_accepted():
    assert load_image(encode(Image.new("RGB", (2, 2))), max_pixels=LIMIT).shape == (2, 2, 3)


# ----------------------------------------------------------------------------- bad inputs, one clear line each


def test_zero_bytes(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    message = assert_one_line_error(path, "empty file (0 bytes)")
    assert message.startswith(str(path))


SECRET = "root:$6$Zq9sEcReT-7731:19000:0:99999:7:::"


def test_text_named_png_says_what_kind_of_file_not_what_it_holds(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text(SECRET + "\n")
    message = assert_one_line_error(path, f"notes.png: not an image: a text file ({len(SECRET) + 1} bytes)")
    for fragment in ("root", "Zq9s", "19000", ":::"):
        assert fragment not in message.replace(str(tmp_path), "")


def test_binary_garbage_is_named_by_kind_and_size_not_by_its_bytes():
    message = assert_one_line_error(bytes(range(256)) * 4, "not an image in a supported format", name="blob.bin")
    assert message == "blob.bin: not an image in a supported format (binary data, 1,024 bytes)"


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"%PDF-1.7\n" + SECRET.encode(), "a PDF document"),
        (b"PK\x03\x04" + SECRET.encode(), "a zip archive"),
        (b"\x7fELF\x02\x01" + SECRET.encode(), "an executable (ELF)"),
        (b"\x00\x00\x00\x18ftypheic" + SECRET.encode(), "a HEIF/AVIF image"),
        ("日本語のテキスト、秘密".encode() + SECRET.encode(), "a text file"),
    ],
    ids=["pdf", "zip", "elf", "heif", "utf8-text"],
)
def test_other_kinds_of_file_are_named_never_quoted(data, kind):
    message = assert_one_line_error(data, kind, name="x.png")
    assert "Zq9s" not in message and "root" not in message and "秘密" not in message


def test_decoder_complaints_never_quote_the_file():
    data = bytearray(encode(Image.fromarray(random_rgb(16, 16))))
    data[12:16] = b"Zq9s"  # a chunk type no decoder knows
    with pytest.raises(ImageError) as caught:
        load_image(bytes(data), max_pixels=LIMIT, name="odd.png")
    assert "Zq9s" not in str(caught.value) and "odd.png" in str(caught.value)
    # what a decoder quotes from the file (Pillow names chunk types and markers as bytes) is cut out
    complaint = SyntaxError("broken PNG file (bad header checksum in b'Zq9s')\nmore")
    assert images._reason(complaint) == "broken PNG file (bad header checksum in …)"
    assert images._reason(OSError("image file is truncated (4 bytes not processed)")) == (
        "image file is truncated (4 bytes not processed)"
    )


def test_cut_short_files_raise_the_retryable_error():
    data = encode(Image.fromarray(random_rgb(64, 64)))
    for cut in (data[:5], data[:40], data[: len(data) // 2]):
        with pytest.raises(TruncatedImageError):
            load_image(cut, max_pixels=LIMIT, name="cut.png")
    with pytest.raises(TruncatedImageError):
        load_image(b"", max_pixels=LIMIT, name="empty.png")
    with pytest.raises(ImageError) as caught:
        load_image(SECRET.encode(), max_pixels=LIMIT, name="notes.png")
    assert not isinstance(caught.value, TruncatedImageError)  # a text file will not become an image by waiting


def test_truncated_png():
    data = encode(Image.fromarray(random_rgb(64, 64)))
    message = assert_one_line_error(data[: len(data) // 2], "truncated or corrupt", name="cut.png")
    assert message.startswith("cut.png:")


def test_truncated_jpeg():
    data = encode(Image.fromarray(random_rgb(64, 64)), "JPEG", quality=90)
    assert_one_line_error(data[: len(data) // 2], "truncated or corrupt", name="cut.jpg")


def test_header_only_png_is_truncated():
    assert_one_line_error(encode(Image.fromarray(random_rgb()))[:40], "cut.png", name="cut.png")


def test_one_by_one_is_too_small():
    assert_one_line_error(encode(Image.new("RGB", (1, 1))), "too small (1×1)", name="dot.png")
    assert_one_line_error(encode(Image.new("RGB", (1, 50))), "too small (1×50)", name="line.png")


def test_decompression_bomb_is_refused_from_the_header():
    data = bomb_png(30000, 30000)
    assert len(data) < 100
    message = assert_one_line_error(data, "refused before decoding", name="bomb.png")
    assert "900,000,000 pixels" in message and "64,000,000" in message


def test_large_image_over_the_configured_limit_names_its_size():
    data = bomb_png(10000, 9000)  # 90 M pixels: above the 64 M limit, in Pillow's warning band
    message = assert_one_line_error(data, "10000×9000 = 90,000,000 pixels", name="big.png")
    assert "EAGLE_MAX_IMAGE_PIXELS" in message
    assert_one_line_error(encode(Image.fromarray(random_rgb(100, 100))), "100×100 = 10,000", max_pixels=5000)


def test_missing_file_and_directory(tmp_path):
    assert_one_line_error(tmp_path / "nope.png", "file not found")
    assert_one_line_error(tmp_path, "is a directory")


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


# ----------------------------------------------------------------------------- listing


def test_list_images_is_recursive_sorted_and_filtered(tmp_path):
    for relative in ["b.png", "a.JPG", "sub/c.jpeg", "sub/deeper/d.tiff", "e.bmp", "f.webp", "g.tif"]:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    for relative in ["notes.txt", "._b.png", "model.onnx", "sub/.hidden.png"]:
        (tmp_path / relative).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a.JPG", "b.png", "e.bmp", "f.webp", "g.tif", "sub/c.jpeg", "sub/deeper/d.tiff"]
    assert list_images(tmp_path / "sub" / "deeper") == [tmp_path / "sub" / "deeper" / "d.tiff"]


def test_list_images_refuses_a_non_directory(tmp_path):
    with pytest.raises(ImageError, match="not a directory"):
        list_images(tmp_path / "missing")
    assert list_images(Path(tmp_path)) == []
