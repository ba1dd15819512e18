"""Image files <-> float RGB arrays, keeping what can be kept: bit depth, alpha, EXIF orientation,
the colour profile and EXIF.

Reading looks at the file's header first, parsed as the decoders parse it, so that an image too large
for memory is refused before it is decoded; OpenCV's own pixel limit and a check of the decoded shape
back that up. Writing goes through a temporary file, so that a failed write leaves what was there.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from .atomic import write_file_atomically
from .metadata import (
    JPEG_EXIF_LIMIT,
    METADATA_LIMIT,
    ImageMetadata,
    from_tiff,
    icc_from_jpeg,
    icc_from_png,
    jpeg_with_icc,
    tiff_with_metadata,
    upright_exif,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MAX_MEGAPIXELS = 200.0  # a 200 MP photo is 2.4 GB as float RGB, before any processing
# OpenCV's own limit, set by gpen/__init__.py to the same number before OpenCV loads, so that a file whose
# header we read otherwise than its decoder does is still refused by the decoder.
OPENCV_LIMIT = "OPENCV_IO_MAX_IMAGE_PIXELS"
METADATA_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # OpenCV writes their metadata (see _encode)


@dataclass(frozen=True)
class ImageFormat:
    channels: int  # 1, 3 or 4
    bits: int  # 8 or 16
    metadata: ImageMetadata = field(default=ImageMetadata(), compare=False, repr=False)  # carried, not a format


@dataclass(frozen=True)
class ImageHeader:
    width: int  # as stored, before the EXIF orientation turns it
    height: int
    orientation: int = 1  # EXIF: 1 upright, 2..8 mirrored and/or turned
    metadata: ImageMetadata = field(default=ImageMetadata(), compare=False, repr=False)
    decoder_turns: bool = False  # OpenCV applies the orientation itself (a TIFF's own tag)

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6

    @property
    def upright_size(self) -> tuple[int, int]:
        """(width, height) once the orientation is applied: 5..8 turn the image by 90 degrees."""
        return (self.height, self.width) if self.orientation >= 5 else (self.width, self.height)


def read_image(path: str | os.PathLike,
               max_megapixels: float | None = MAX_MEGAPIXELS) -> tuple[np.ndarray, ImageFormat]:
    """(H,W,C) float32 RGB(A) or gray in 0..1, upright per EXIF, and the file's channels and depth.

    Images over `max_megapixels` (None or 0: no limit) are refused from their header, undecoded, and
    from their decoded shape, before any copy, should the decoder have read the header otherwise.
    """
    path = Path(path)
    header = check_image_size(path, max_megapixels)
    try:
        raw = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)  # the one decode
    except cv2.error as e:
        if "CV_IO_MAX_IMAGE_PIXELS" not in str(e):
            raise ValueError(f"{path}: OpenCV cannot decode it ({str(e).strip().splitlines()[-1]})") from None
        raise ValueError(f"{path}: over OpenCV's own limit of {os.environ.get(OPENCV_LIMIT)} pixels ({OPENCV_LIMIT}, "
                         "read when OpenCV is loaded: set it before starting to read larger images)") from None
    if raw is None:
        raise ValueError(f"{path}: not an image OpenCV can read")
    _check_megapixels(path, raw.shape[1], raw.shape[0], max_megapixels, "decoded, ")
    if raw.ndim == 2:
        raw = raw[..., None]
    elif raw.shape[2] in (3, 4):
        raw = cv2.cvtColor(raw, cv2.COLOR_BGR2RGB if raw.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    bits = 16 if raw.dtype == np.uint16 else 8
    scale = 1.0 if raw.dtype.kind == "f" else 65535.0 if bits == 16 else 255.0
    turned = upright(raw, 1 if header.decoder_turns else header.orientation)
    image = np.divide(turned, np.float32(scale), dtype=np.float32)
    return image, ImageFormat(raw.shape[2], bits, header.metadata)


def check_image_size(path: str | os.PathLike, max_megapixels: float | None = MAX_MEGAPIXELS) -> ImageHeader:
    """The file's header, or a ValueError when it holds more than `max_megapixels` (None or 0: no limit)."""
    path = Path(path)
    header = read_header(path)
    _check_megapixels(path, header.width, header.height, max_megapixels)
    return header


def _check_megapixels(path: Path, width: int, height: int, max_megapixels: float | None, how: str = "") -> None:
    megapixels = width * height / 1e6
    if max_megapixels and megapixels > max_megapixels:
        raise ValueError(f"{path}: {how}{width}x{height} is {megapixels:.0f} megapixels, "
                         f"over the {max_megapixels:g} MP limit (--max-megapixels raises it)")


def read_header(path: str | os.PathLike) -> ImageHeader:
    """Size and EXIF orientation of a PNG, JPEG, BMP, TIFF or WebP file, read without decoding it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        start = f.read(12)
        reader = _header_reader(start)
        if reader is None:
            raise ValueError(f"{path}: not a PNG, JPEG, BMP, TIFF or WebP image")
        try:
            return reader(f)
        except (ValueError, struct.error):
            raise ValueError(f"{path}: damaged image header") from None


def upright(image: np.ndarray, orientation: int) -> np.ndarray:
    """(H,W,C) turned and mirrored as EXIF orientation 1..8 says (a view, not a copy)."""
    turned = {1: image, 2: image[:, ::-1], 3: image[::-1, ::-1], 4: image[::-1], 5: image.swapaxes(0, 1),
              6: np.rot90(image, -1), 7: image[::-1, ::-1].swapaxes(0, 1), 8: np.rot90(image)}
    return turned.get(orientation, image)


def write_image(path: str | os.PathLike, image: np.ndarray, fmt: ImageFormat | None = None,
                overwrite: bool = True) -> None:
    """Write (H,W,C) float 0..1 in `fmt`'s depth (16-bit only where the file type holds it), with its
    colour profile and EXIF where the file type holds them (JPEG, PNG, WebP, TIFF).

    The file appears whole or not at all: a failed or interrupted write leaves what was at `path`.
    With overwrite=False an existing file is kept and FileExistsError raised.
    """
    path = Path(path)
    bits = fmt.bits if fmt else 8
    if bits == 16 and path.suffix.lower() not in (".png", ".tif", ".tiff"):
        bits = 8
    scale, dtype = (65535.0, np.uint16) if bits == 16 else (255.0, np.uint8)
    pixels = (np.clip(image, 0, 1) * scale + 0.5).astype(dtype)
    channels = pixels.shape[2]
    if channels == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    elif channels == 4:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGBA2BGRA)
    metadata = fmt.metadata if fmt else ImageMetadata()
    try:
        ok, encoded = _encode(path.suffix.lower(), pixels, metadata)
    except cv2.error:
        ok = False
    if not ok:
        raise ValueError(f"{path}: OpenCV cannot write this file type")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, encoded, overwrite)


def _encode(suffix: str, pixels: np.ndarray, metadata: ImageMetadata) -> tuple[bool, bytes]:
    """The file's bytes with what of `metadata` its type holds. OpenCV writes the profile and EXIF of a
    PNG or WebP, and the EXIF of a JPEG; a JPEG's profile (split into 64 KB segments, which OpenCV does
    not do) and a TIFF's tags are added here."""
    jpeg = suffix in (".jpg", ".jpeg")
    kept = {cv2.IMAGE_METADATA_ICCP: None if jpeg else metadata.icc,
            cv2.IMAGE_METADATA_EXIF: None if jpeg and len(metadata.exif or b"") > JPEG_EXIF_LIMIT else metadata.exif}
    kept = {kind: np.frombuffer(data, np.uint8) for kind, data in kept.items() if data}
    if suffix in METADATA_SUFFIXES and kept:
        ok, encoded = cv2.imencodeWithMetadata(suffix, pixels, list(kept), list(kept.values()))
    else:
        ok, encoded = cv2.imencode(suffix, pixels)
    if not ok:
        return False, b""
    encoded = encoded.tobytes()
    if jpeg:
        return True, jpeg_with_icc(encoded, metadata.icc)
    if suffix in (".tif", ".tiff"):
        return True, tiff_with_metadata(encoded, metadata)
    return True, encoded


def _header_reader(start: bytes):
    """The header reader for a file starting with these 12 bytes, or None."""
    if start.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png_header
    if start.startswith(b"\xff\xd8"):
        return _jpeg_header
    if start.startswith(b"BM"):
        return _bmp_header
    if start[:4] in (b"II*\0", b"MM\0*"):
        return _tiff_header
    if start[:4] == b"RIFF" and start[8:12] == b"WEBP":
        return _webp_header
    return None


def _read(f: BinaryIO, size: int) -> bytes:
    data = f.read(max(size, 0))
    if size < 0 or len(data) < size:
        raise ValueError("header field out of place")
    return data


def _png_header(f: BinaryIO) -> ImageHeader:
    f.seek(8)
    width = height = 0
    orientation, icc, exif = 1, None, None
    while True:  # chunks up to the pixel data: IHDR first, maybe iCCP and eXIf
        length, kind = struct.unpack(">I4s", _read(f, 8))
        if kind in (b"IDAT", b"IEND"):
            return ImageHeader(width, height, orientation, ImageMetadata(icc, exif))
        if kind not in (b"IHDR", b"iCCP", b"eXIf") or length > METADATA_LIMIT:
            f.seek(length + 4, io.SEEK_CUR)  # and the CRC
            continue
        data = _read(f, length)
        if kind == b"IHDR":
            width, height = struct.unpack(">II", data[:8])
        elif kind == b"iCCP" and icc is None:  # PNG allows one
            icc = icc_from_png(data)
        elif kind == b"eXIf":
            orientation, exif = _exif_orientation(data), upright_exif(data)
        f.seek(4, io.SEEK_CUR)  # CRC


def _jpeg_header(f: BinaryIO) -> ImageHeader:
    f.seek(2)
    orientation, exif, icc_pieces, icc_count = 1, None, {}, 0
    while True:  # segments up to the frame header (SOF), maybe an APP1 Exif and APP2 ICC pieces on the way
        marker = _next_jpeg_marker(f)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn and TEM stand alone, without a length
            continue
        (length,) = struct.unpack(">H", _read(f, 2))
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">xHH", _read(f, 5))
            return ImageHeader(width, height, orientation, ImageMetadata(icc_from_jpeg(icc_pieces, icc_count), exif))
        data = _read(f, length - 2)
        if marker == 0xE1 and data.startswith(b"Exif\0\0"):
            orientation, exif = _exif_orientation(data), upright_exif(data)
        elif marker == 0xE2 and data.startswith(b"ICC_PROFILE\0") and len(data) > 14:
            icc_pieces.setdefault(data[12], data[14:])  # numbered from 1, of data[13] pieces
            icc_count = data[13]


def _next_jpeg_marker(f: BinaryIO) -> int:
    """The next marker as libjpeg finds it: bytes before an 0xFF are skipped (libjpeg warns and goes on),
    then any number of 0xFF fill bytes; 0xFF 0x00 is a stuffed zero, not a marker."""
    while True:
        _skip(f, lambda block: block.find(b"\xff"))
        _skip(f, lambda block: len(block) - len(block.lstrip(b"\xff")))
        byte = _read(f, 1)
        if byte != b"\0":
            return byte[0]


def _skip(f: BinaryIO, first_kept) -> None:
    """Read on, a block at a time, to the first byte kept: first_kept(block) is its index, or -1 or
    len(block) when there is none in the block."""
    while block := f.read(4096):
        at = first_kept(block)
        if 0 <= at < len(block):
            f.seek(at - len(block), io.SEEK_CUR)
            return
    raise ValueError("no frame header")


def _bmp_header(f: BinaryIO) -> ImageHeader:
    f.seek(14)
    (size,) = struct.unpack("<I", _read(f, 4))
    width, height = struct.unpack("<HH" if size == 12 else "<ii", _read(f, 4 if size == 12 else 8))
    return ImageHeader(width, abs(height))  # negative height: rows stored top-down


def _tiff_header(f: BinaryIO) -> ImageHeader:
    tags = _tiff_tags(f)
    if 256 not in tags or 257 not in tags:
        raise ValueError("no image width and length")
    return ImageHeader(tags[256], tags[257], tags.get(0x0112, 1), from_tiff(f), decoder_turns=True)


def _webp_header(f: BinaryIO) -> ImageHeader:
    f.seek(12)
    size, orientation, icc, exif = None, 1, None, None
    while chunk := f.read(8):  # RIFF chunks: the image's, maybe an ICC profile before it and EXIF after it
        kind, length = struct.unpack("<4sI", chunk)
        whole = kind in (b"EXIF", b"ICCP") and length <= METADATA_LIMIT
        data = _read(f, length if whole else min(length, 10))
        if kind == b"VP8X":
            size = int.from_bytes(data[4:7], "little") + 1, int.from_bytes(data[7:10], "little") + 1
        elif kind == b"VP8 " and size is None:
            w, h = struct.unpack("<HH", data[6:10])
            size = w & 0x3FFF, h & 0x3FFF
        elif kind == b"VP8L" and size is None:
            bits = int.from_bytes(data[1:5], "little")
            size = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        elif kind == b"EXIF" and whole:
            orientation, exif = _exif_orientation(data), upright_exif(data)
        elif kind == b"ICCP" and whole:
            icc = data
        f.seek(length + (length & 1) - len(data), io.SEEK_CUR)  # chunks are padded to even sizes
    if size is None:
        raise ValueError("no image chunk")
    return ImageHeader(*size, orientation, ImageMetadata(icc, exif))


TIFF_NUMBERS = {1: "B3x", 3: "H2x", 4: "I"}  # BYTE, SHORT, LONG: the types libtiff takes for a size


def _tiff_tags(f: BinaryIO) -> dict[int, int]:
    """The single-number tags of the first image directory of a TIFF structure (a file or EXIF block),
    read as libtiff reads them: of a tag given twice, the first counts."""
    f.seek(0)
    order = {b"II": "<", b"MM": ">"}.get(_read(f, 2))
    if order is None:
        raise ValueError("not a TIFF structure")
    _, offset = struct.unpack(order + "HI", _read(f, 6))
    f.seek(offset)
    (count,) = struct.unpack(order + "H", _read(f, 2))
    tags = {}
    for _ in range(count):
        tag, kind, n, value = struct.unpack(order + "HHI4s", _read(f, 12))
        if n == 1 and kind in TIFF_NUMBERS:
            tags.setdefault(tag, struct.unpack(order + TIFF_NUMBERS[kind], value)[0])
    return tags


def _exif_orientation(exif: bytes) -> int:
    try:
        return _tiff_tags(io.BytesIO(exif.removeprefix(b"Exif\0\0"))).get(0x0112, 1)
    except (ValueError, struct.error):
        return 1  # damaged EXIF: OpenCV ignores it too

