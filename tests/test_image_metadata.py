"""A photo's colour profile and EXIF come through a restore: read_image carries them in the format it
returns, write_image writes them, with the orientation reset since the pixels are stored upright.

Pillow, an independent reader and writer, makes the inputs and checks the outputs."""

import numpy as np
import pytest

from gpen.files.images import ImageFormat, read_image, write_image

Image = pytest.importorskip("PIL.Image")
ImageCms = pytest.importorskip("PIL.ImageCms")

SUFFIXES = [".jpg", ".png", ".webp", ".tif"]
ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
CAMERA, TAKEN, LATITUDE = "GPEN test camera", "2026:12:03 12:00:00", "N"


def phone_photo(path, icc: bytes = ICC) -> None:
    """What a phone writes: a 30x20 picture stored sideways (EXIF orientation 6), with a colour profile,
    the camera's name, the time it was taken (in the Exif directory) and where (in the GPS directory)."""
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, CAMERA
    exif.get_ifd(0x8769)[0x9003] = TAKEN
    exif.get_ifd(0x8825)[0x0001] = LATITUDE
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:, :10] = 255  # white on the left as stored: on top once upright
    Image.fromarray(pixels).save(path, icc_profile=icc, exif=exif.tobytes(), lossless=True)


def assert_kept(path, icc: bytes = ICC) -> None:
    with Image.open(path) as written:
        exif = written.getexif()
        assert written.info.get("icc_profile") == icc
        assert exif.get(0x0112, 1) == 1 and exif[0x010F] == CAMERA
        assert exif.get_ifd(0x8769)[0x9003] == TAKEN and exif.get_ifd(0x8825)[0x0001] == LATITUDE


@pytest.mark.parametrize("target", SUFFIXES)
@pytest.mark.parametrize("source", SUFFIXES)
def test_the_profile_and_exif_are_kept_and_the_orientation_reset(tmp_path, source, target):
    phone_photo(tmp_path / f"photo{source}")
    image, fmt = read_image(tmp_path / f"photo{source}")
    assert image.shape == (30, 20, 3) and image[:5].min() > 0.9 and image[-5:].max() < 0.1  # upright
    write_image(tmp_path / f"restored{target}", image, fmt)
    assert_kept(tmp_path / f"restored{target}")
    assert read_image(tmp_path / f"restored{target}")[0].shape == (30, 20, 3)  # not turned a second time


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_files_keep_their_depth_and_metadata(tmp_path, suffix):
    phone_photo(tmp_path / "photo.jpg")
    image, fmt = read_image(tmp_path / "photo.jpg")
    write_image(tmp_path / f"deep{suffix}", image, ImageFormat(3, 16, fmt.metadata))
    assert read_image(tmp_path / f"deep{suffix}")[1] == ImageFormat(3, 16)
    assert_kept(tmp_path / f"deep{suffix}")


def test_a_profile_split_over_several_jpeg_segments_is_kept_whole(tmp_path):
    large = ICC + bytes(150_000)  # a JPEG segment holds 64 KB: this takes three
    phone_photo(tmp_path / "photo.jpg", icc=large)
    image, fmt = read_image(tmp_path / "photo.jpg")
    write_image(tmp_path / "restored.jpg", image, fmt)
    assert_kept(tmp_path / "restored.jpg", icc=large)


def test_a_restore_from_the_command_line_keeps_them(tmp_path, small_checkpoint, monkeypatch):
    from gpen.apps import cli, jobs

    monkeypatch.setattr(jobs, "keep_freed_memory", lambda: None)  # the test process keeps its allocator
    phone_photo(tmp_path / "photo.jpg")
    assert cli.main(["restore", str(tmp_path / "photo.jpg"), "-o", str(tmp_path / "restored.png"), "--aligned",
                     "--model", str(small_checkpoint)]) == 0
    assert_kept(tmp_path / "restored.png")


def test_files_without_metadata_are_written_without_any(tmp_path):
    write_image(tmp_path / "plain.png", np.zeros((8, 8, 3)))
    write_image(tmp_path / "copy.tif", *read_image(tmp_path / "plain.png"))
    for name in ("plain.png", "copy.tif"):
        with Image.open(tmp_path / name) as written:
            assert "icc_profile" not in written.info and 0x010F not in written.getexif()


def test_a_tiff_whose_tags_all_claim_the_same_megabyte_costs_at_most_16_mb(tmp_path):
    """Tag values may overlap, so a file's size bounds nothing: 100 tags, each the file's whole 1 MB."""
    import struct

    size = 1 << 20
    entries = [(256, 3, 1, 8), (257, 3, 1, 8), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 8),
               (277, 3, 1, 1), (278, 3, 1, 8), (279, 4, 1, 64)] + [(40000 + i, 7, size, 0) for i in range(100)]
    table = b"".join(struct.pack("<HHII", *entry) for entry in entries)
    header = b"II*\0" + struct.pack("<I", size) + bytes(size - 8)
    (tmp_path / "overlapping.tif").write_bytes(header + struct.pack("<H", len(entries)) + table + bytes(4))
    _, fmt = read_image(tmp_path / "overlapping.tif")
    assert len(fmt.metadata.exif) < 17 << 20


def test_damaged_exif_is_left_out_not_a_failure(tmp_path):
    from gpen.files.metadata import ImageMetadata

    for damaged in (b"II*\0\xff\xff\xff\xff", b"MM\0*\0\0\0\x08\x00\x05"):  # a directory out of place; cut short
        write_image(tmp_path / "out.tif", np.zeros((8, 8, 3)), ImageFormat(3, 8, ImageMetadata(ICC, damaged)))
        with Image.open(tmp_path / "out.tif") as written:
            assert written.info.get("icc_profile") == ICC and written.size == (8, 8)


def test_a_turned_tiff_is_measured_upright_and_turned_once(tmp_path):
    from gpen.files.images import read_header

    phone_photo(tmp_path / "photo.tif")  # 30 wide, 20 high as stored; OpenCV turns a TIFF by its own tag
    assert read_header(tmp_path / "photo.tif").upright_size == (20, 30)
    image, _ = read_image(tmp_path / "photo.tif")
    assert image.shape == (30, 20, 3) and image[:5].min() > 0.9
