"""An image file's colour profile (ICC) and EXIF, carried from the file read to the file written.

EXIF travels as a TIFF structure (what a PNG eXIf or WebP EXIF chunk holds, and a JPEG APP1 segment
after "Exif\\0\\0"), with its orientation set to 1, since pixels are stored upright. A TIFF file holds
both as tags of its own directory instead: they are moved between the two shapes here.
"""

from __future__ import annotations

import contextlib
import io
import struct
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

METADATA_LIMIT = 16 << 20  # ICC profiles run to a few MB, EXIF to 64 KB in a JPEG: larger is not kept
JPEG_EXIF_LIMIT = 0xFFFF - 2 - 6  # one APP1 segment, less its length and "Exif\0\0"
JPEG_ICC_PIECE = 0xFFFF - 2 - 14  # one APP2 segment, less its length, "ICC_PROFILE\0" and the piece's number
ORIENTATION, ICC_PROFILE = 0x0112, 34675
POINTERS = {34665, 34853, 40965}  # the Exif, GPS and Interoperability directories
# Tags that describe a TIFF's own pixels (their size, layout, compression, colour space): never taken
# from one file's EXIF into another file's directory.
STRUCTURE = {254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 277, 278, 279, 280, 281, 284, 292, 293, 317,
             318, 319, 320, 322, 323, 324, 325, 330, 338, 339, 340, 341, 513, 514, 530, 531, 532, 700, ICC_PROFILE}
SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}  # bytes per value
UNITS = {3: 2, 8: 2, 4: 4, 9: 4, 11: 4, 13: 4, 5: 4, 10: 4, 12: 8}  # bytes swapped together between byte orders
MAX_ENTRIES = 4096


@dataclass(frozen=True)
class ImageMetadata:
    icc: bytes | None = None  # an ICC profile
    exif: bytes | None = None  # a TIFF structure, orientation 1


@dataclass
class Entry:
    """One tag of a TIFF directory: its type, count and value bytes, or the directory it points to."""

    kind: int
    count: int
    value: bytes
    directory: dict[int, Entry] | None = field(default=None, repr=False)


def upright_exif(exif: bytes) -> bytes | None:
    """A PNG, WebP or JPEG EXIF block as a TIFF structure with orientation 1, every other byte as it was;
    None when it is no TIFF structure."""
    exif = exif.removeprefix(b"Exif\0\0")
    order = {b"II": "<", b"MM": ">"}.get(exif[:2])
    if order is None or len(exif) > METADATA_LIMIT:
        return None
    try:
        (offset,) = struct.unpack_from(order + "I", exif, 4)
        (count,) = struct.unpack_from(order + "H", exif, offset)
        patched = bytearray(exif)
        for at in range(offset + 2, offset + 2 + 12 * count, 12):
            tag, kind, n = struct.unpack_from(order + "HHI", exif, at)
            if tag == ORIENTATION and kind == 3 and n == 1:
                struct.pack_into(order + "H", patched, at + 8, 1)
    except struct.error:
        return None
    return bytes(patched)


def icc_from_png(chunk: bytes) -> bytes | None:
    """The profile of a PNG iCCP chunk: a name, a NUL, method 0, then the profile deflated."""
    rest = chunk.partition(b"\0")[2]
    if not rest or rest[0] != 0:
        return None
    inflate = zlib.decompressobj()
    try:
        profile = inflate.decompress(rest[1:], METADATA_LIMIT)
    except zlib.error:
        return None
    return profile if profile and not inflate.unconsumed_tail else None


def icc_from_jpeg(pieces: dict[int, bytes], count: int) -> bytes | None:
    """A profile from the numbered APP2 pieces it was split into, when every one of them is there."""
    if not count or sorted(pieces) != list(range(1, count + 1)):
        return None
    return b"".join(pieces[i] for i in range(1, count + 1))


def jpeg_with_icc(encoded: bytes, icc: bytes | None) -> bytes:
    """A JPEG file given a profile, in as many APP2 segments as it takes (up to 255), after its leading
    APP0 (JFIF) and APP1 (Exif) segments."""
    if not icc or len(icc) > 255 * JPEG_ICC_PIECE:
        return encoded
    at = 2
    while encoded[at:at + 2] in (b"\xff\xe0", b"\xff\xe1"):
        at += 2 + struct.unpack_from(">H", encoded, at + 2)[0]
    pieces = [icc[i:i + JPEG_ICC_PIECE] for i in range(0, len(icc), JPEG_ICC_PIECE)]
    segments = b"".join(b"\xff\xe2" + struct.pack(">H", 2 + 14 + len(piece)) + b"ICC_PROFILE\0"
                        + bytes([number, len(pieces)]) + piece for number, piece in enumerate(pieces, 1))
    return encoded[:at] + segments + encoded[at:]


def from_tiff(f: BinaryIO) -> ImageMetadata:
    """The ICC profile and the descriptive tags (camera, date, GPS, ...) of a TIFF file's first directory."""
    try:
        order, directory = read_structure(f)
    except (ValueError, struct.error):
        return ImageMetadata()
    icc = directory.pop(ICC_PROFILE, None)
    described = {tag: entry for tag, entry in directory.items() if tag not in STRUCTURE and tag != ORIENTATION}
    return ImageMetadata(icc.value if icc and icc.kind in (1, 7) else None,
                         tiff_structure(described, order) if described else None)


def tiff_with_metadata(encoded: bytes, metadata: ImageMetadata) -> bytes:
    """A TIFF file (one directory, as OpenCV writes it) given the profile and EXIF tags: a new directory
    is appended, pointing at the same pixels, and the header made to point at it."""
    if not (metadata.icc or metadata.exif):
        return encoded
    order, directory = read_structure(io.BytesIO(encoded), budget=len(encoded))  # ours: all of it
    try:
        exif_order, tags = read_structure(io.BytesIO(metadata.exif or b""))
    except (ValueError, struct.error):  # no EXIF, or too damaged to read: written without it
        exif_order, tags = order, {}
    for tag, entry in tags.items():
        if tag not in STRUCTURE and tag != ORIENTATION:
            directory.setdefault(tag, reorder(entry, exif_order, order))
    if metadata.icc:
        directory[ICC_PROFILE] = Entry(7, len(metadata.icc), metadata.icc)
    base = len(encoded) + len(encoded) % 2  # values start on a word boundary
    out = bytearray(encoded + bytes(base - len(encoded)) + pack_directory(directory, order, base))
    struct.pack_into(order + "I", out, 4, base)
    return bytes(out)


def read_structure(f: BinaryIO, budget: int = METADATA_LIMIT) -> tuple[str, dict[int, Entry]]:
    """The byte order and first directory of a TIFF structure (a file, or an EXIF block), reading no
    more than `budget` bytes of values."""
    f.seek(0)
    order = {b"II": "<", b"MM": ">"}.get(f.read(2))
    if order is None:
        raise ValueError("not a TIFF structure")
    _, offset = struct.unpack(order + "HI", f.read(6))
    return order, read_directory(f, order, offset, [budget])


def read_directory(f: BinaryIO, order: str, offset: int, budget: list[int], depth: int = 0) -> dict[int, Entry]:
    """A directory's tags as libtiff takes them (the first of duplicates), with the Exif, GPS and
    Interoperability directories they point to; values of unknown types, or past the budget of bytes
    left to read (values may overlap, so the file's size bounds nothing), are left."""
    f.seek(offset)
    (count,) = struct.unpack(order + "H", _read(f, 2))
    if count > MAX_ENTRIES:
        raise ValueError("not a TIFF directory")
    table = _read(f, 12 * count)
    directory = {}
    for at in range(0, 12 * count, 12):
        tag, kind, n, field_ = struct.unpack_from(order + "HHI4s", table, at)
        size = SIZES.get(kind, 0) * n
        if tag in directory or not size or size > budget[0]:
            continue
        budget[0] -= size
        (where,) = struct.unpack(order + "I", field_)
        if tag in POINTERS and n == 1 and kind in (4, 13) and depth < 2:
            with contextlib.suppress(ValueError, struct.error):  # a damaged Exif or GPS directory is left out
                directory[tag] = Entry(kind, 1, b"", read_directory(f, order, where, budget, depth + 1))
        elif size <= 4:
            directory[tag] = Entry(kind, n, field_[:size])
        else:
            f.seek(where)
            directory[tag] = Entry(kind, n, _read(f, size))
    return directory


def tiff_structure(directory: dict[int, Entry], order: str) -> bytes:
    """A TIFF structure holding one directory: what EXIF is."""
    header = (b"II*\0" if order == "<" else b"MM\0*") + struct.pack(order + "I", 8)
    return header + pack_directory(directory, order, 8)


def pack_directory(directory: dict[int, Entry], order: str, base: int) -> bytes:
    """A directory's bytes when placed at offset `base`: its table, then the values too long for it and
    the directories it points to."""
    table_size = 2 + 12 * len(directory) + 4
    table, rest = bytearray(struct.pack(order + "H", len(directory))), bytearray()
    for tag in sorted(directory):
        entry = directory[tag]
        where = base + table_size + len(rest)
        if entry.directory is not None:
            rest += pack_directory(entry.directory, order, where)
            value = struct.pack(order + "I", where)
        elif len(entry.value) <= 4:
            value = entry.value.ljust(4, b"\0")
        else:
            rest += entry.value
            value = struct.pack(order + "I", where)
        rest += bytes(len(rest) % 2)
        table += struct.pack(order + "HHI", tag, entry.kind, entry.count) + value
    return bytes(table + struct.pack(order + "I", 0) + rest)


def reorder(entry: Entry, source: str, target: str) -> Entry:
    """The entry with its numbers in the target byte order."""
    if source == target:
        return entry
    if entry.directory is not None:
        return Entry(entry.kind, 1, b"", {tag: reorder(e, source, target) for tag, e in entry.directory.items()})
    unit = UNITS.get(entry.kind)
    if unit is None:
        return entry
    numbers = struct.unpack(f"{source}{len(entry.value) // unit}{'HIQ'[unit // 4]}", entry.value)
    return Entry(entry.kind, entry.count, struct.pack(f"{target}{len(numbers)}{'HIQ'[unit // 4]}", *numbers))


def _read(f: BinaryIO, size: int) -> bytes:
    data = f.read(size)
    if len(data) < size:
        raise ValueError("value out of place")
    return data
