"""Small files that claim huge networks or images are refused quickly, before anything their size is allocated.

Each file is loaded in a fresh Python whose heap is capped at 1 GiB above what importing gpen takes,
so a regression fails here instead of filling the machine; the child reports how much its peak
resident memory grew and how long the refusal took.
"""

import json
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures memory through /proc")

CHILD = r"""
import json, resource, sys, time
import gpen
from gpen import *  # noqa: F403  the package's names load on first use: load them (and torch) before measuring

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))  # kB

resource.setrlimit(resource.RLIMIT_DATA, ((status("VmData") + 2**20) * 1024, resource.RLIM_INFINITY))
before = status("VmHWM")
start = time.perf_counter()
try:
    gpen.load_model(sys.argv[1], device="cpu")
    error = None
except (gpen.CheckpointError, ValueError, RuntimeError) as e:
    error = str(e)
print(json.dumps({"error": error, "seconds": time.perf_counter() - start,
                  "peak_growth_mib": (status("VmHWM") - before) / 1024}))
"""


def load_in_subprocess(path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_refused_cheaply(path, says: str) -> None:
    result = load_in_subprocess(path)
    assert result["error"] is not None and str(path) in result["error"] and says in result["error"], result
    assert result["seconds"] < 5 and result["peak_growth_mib"] < 64, result


def zero_stride_gpen(path) -> None:
    """About 2 KB: the keys GPEN's configuration is read from, as zero-stride views of one float,
    claiming a GPEN-2048 sixteen times as wide as the real one (tens of GB if built)."""
    one = torch.zeros(1)
    shapes = {"generator.style.1.weight": (512, 512), "generator.input.input": (1, 512 * 16, 4, 4),
              "generator.to_rgbs.3.conv.weight": (1, 3, 2 * 256 * 2 * 16, 1, 1), "ecd0.0.0.weight": (1,),
              "final_linear.0.weight": (512, 512 * 16 * 16), **{f"ecd{i}.0.1.weight": (1,) for i in range(1, 10)}}
    torch.save({key: one.expand(shape) for key, shape in shapes.items()}, path)


def test_zero_stride_views_claiming_a_huge_gpen(tmp_path):
    path = tmp_path / "GPEN-BFR-2048.pth"
    zero_stride_gpen(path)
    assert path.stat().st_size < 4096
    assert_refused_cheaply(path, "claims shape")


def pickle_bomb(path, megabytes: int) -> None:
    """A zip checkpoint whose deflated data.pkl expands to `megabytes` MB of a valid pickle: a dict
    holding one long list of zeros, which the weights-only unpickler reads at a few MB/s."""
    base_path = path.with_name(f"{path.name}.base")
    torch.save({"w": torch.zeros(1)}, base_path)  # for the records besides the pickle
    appends = b"(" + b"K\x00" * 511 + b"e"  # MARK, 511 small ints, APPENDS: 1 KB
    with (zipfile.ZipFile(base_path) as base,
          zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as bomb):
        for record in base.infolist():
            if record.filename.endswith("/data.pkl"):
                with bomb.open(record.filename, "w") as f:
                    f.write(b"\x80\x02}X\x04\x00\x00\x00junk]")
                    for _ in range(megabytes * 1024):
                        f.write(appends)
                    f.write(b"s.")
            else:
                bomb.writestr(record, base.read(record))
    base_path.unlink()


def test_pickle_record_that_expands_far_beyond_the_file(tmp_path):
    path = tmp_path / "bomb.pth"
    pickle_bomb(path, megabytes=64)  # ~30 s in the unpickler, uninterruptible
    assert path.stat().st_size < 2**20
    assert_refused_cheaply(path, "pickle record of 64 MB")


def tiny_onnx(path, size: int) -> None:
    """About 100 bytes: an identity graph with one fixed input of 1x3xSIZExSIZE."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    shape = [1, 3, size, size]
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "gpen",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)


def test_onnx_with_a_30000_pixel_input(tmp_path):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "GPEN-BFR-512.onnx"
    tiny_onnx(path, 30000)  # its first restore would take over 8 GB
    assert_refused_cheaply(path, "30000x30000 faces; GPEN exports run from 64 to 4096")


def test_legacy_pickle_claiming_a_huge_storage_costs_no_more_than_the_file(tmp_path):
    """Legacy (non-zip) checkpoints are bounded by their size: torch reserves the claimed 8 GB but
    only touches what it reads from the file."""
    n, huge = 123457, 2**31 - 1
    torch.save({"w": torch.zeros(n)}, tmp_path / "base.pth", _use_new_zipfile_serialization=False)
    data = (tmp_path / "base.pth").read_bytes()
    assert data.count(b"J" + struct.pack("<i", n)) == 2 and data.count(struct.pack("<q", n)) == 1
    data = data.replace(b"J" + struct.pack("<i", n), b"J" + struct.pack("<i", huge))
    data = data.replace(struct.pack("<q", n), struct.pack("<q", huge))
    (tmp_path / "legacy.pth").write_bytes(data[:4096])
    assert_refused_cheaply(tmp_path / "legacy.pth", "truncated or corrupt")


def tiff_bytes(entries: list[tuple[int, int, int]]) -> bytes:
    """A little-endian TIFF whose one directory holds these (tag, type, value) entries, in order, and no pixels."""
    packing = {1: "<B3x", 3: "<H2x", 4: "<I", 11: "<f"}
    ifd = b"".join(struct.pack("<HHI", tag, kind, 1) + struct.pack(packing[kind], value)
                   for tag, kind, value in entries)
    return b"II*\0" + struct.pack("<IH", 8, len(entries)) + ifd + struct.pack("<I", 0)


def gray_tiff(width_entries: list[tuple[int, int, int]]) -> bytes:
    """An 8-bit gray TIFF with these width and length entries, its strip (zeros, uncompressed) claimed at the end."""
    return tiff_bytes([*width_entries, (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 4096), (277, 3, 1),
                       (278, 4, 1 << 20), (279, 4, 1 << 30)])


@pytest.fixture
def no_decoding(monkeypatch):
    """OpenCV's decoder made to fail the test: the files below must be refused before it runs."""
    import cv2

    def decode(*args):
        raise AssertionError("decoded a file whose header should have been refused")

    monkeypatch.setattr(cv2, "imdecode", decode)


def test_a_tiff_that_gives_its_size_twice_is_measured_by_the_first_as_libtiff_does(tmp_path, no_decoding):
    from gpen.files.images import read_image

    path = tmp_path / "twice.tif"  # libtiff keeps the first of duplicate tags and ignores the rest
    path.write_bytes(gray_tiff([(256, 4, 30000), (256, 4, 10), (257, 4, 30000), (257, 4, 10)]))
    with pytest.raises(ValueError, match="30000x30000 is 900 megapixels, over the 200 MP limit"):
        read_image(path)


def test_a_jpeg_with_a_fill_byte_before_its_frame_header_is_measured_as_libjpeg_does(tmp_path, no_decoding):
    from gpen.files.images import read_image

    def frame_header(width, height):  # SOF0, 8-bit, one component
        return b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"

    # libjpeg skips any number of 0xFF before a marker: the first frame header, 16000x16000, is the one
    # it decodes; a reader that takes 0xFF 0xFF for a marker with a length lands on the 16x16 one
    real = b"\xff\xd8\xff" + frame_header(16000, 16000)
    path = tmp_path / "filled.jpg"
    path.write_bytes(real + bytes(0xC000 + 6 - len(real)) + frame_header(16, 16) + b"\xff\xd9")
    with pytest.raises(ValueError, match="16000x16000 is 256 megapixels, over the 200 MP limit"):
        read_image(path)


@pytest.mark.parametrize("kind, says", [(1, None), (11, "damaged image header")])
def test_a_tiff_size_of_an_odd_type_is_read_as_libtiff_reads_it_or_refused_by_name(tmp_path, kind, says):
    from gpen.files.images import read_header

    path = tmp_path / "odd.tif"
    path.write_bytes(gray_tiff([(256, kind, 10), (257, 3, 20)]))  # BYTE: libtiff takes it; FLOAT: nothing does
    if says is None:
        assert (read_header(path).width, read_header(path).height) == (10, 20)
    else:
        with pytest.raises(ValueError, match=f"^{path}: {says}"):
            read_header(path)


def test_the_decoded_shape_is_checked_before_any_copy(tmp_path, monkeypatch):
    """Should a decoder read some header otherwise than read_header, its result is measured too."""
    import cv2

    from gpen.files import images

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((64, 64, 3), np.uint8))
    monkeypatch.setattr(images, "read_header", lambda path: images.ImageHeader(1, 1))
    with pytest.raises(ValueError, match=r"a.png: decoded, 64x64 is 0 megapixels, over the 0.001 MP limit"):
        images.read_image(tmp_path / "a.png", max_megapixels=0.001)


OPENCV_CHILD = r"""
import os, sys
import gpen.loader  # as the CLI and the nodes start: modules that load OpenCV before files/images.py
import gpen.files.images as images
print(os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"])
try:
    images.read_image(sys.argv[1], max_megapixels=None)
except ValueError as e:
    print(e)
"""


@pytest.mark.parametrize("limit", [None, "100"])
def test_opencv_is_loaded_with_the_same_pixel_limit_unless_one_is_set(tmp_path, limit):
    import cv2

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((20, 30, 3), np.uint8))  # 600 pixels
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    env |= {"OPENCV_IO_MAX_IMAGE_PIXELS": limit} if limit else {}
    done = subprocess.run([sys.executable, "-c", OPENCV_CHILD, str(tmp_path / "a.png")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    if limit is None:
        from gpen.files.images import MAX_MEGAPIXELS

        assert done.stdout == f"{int(MAX_MEGAPIXELS * 1e6)}\n"
    else:
        refusal = (f"{tmp_path / 'a.png'}: over OpenCV's own limit of 100 pixels (OPENCV_IO_MAX_IMAGE_PIXELS, "
                   "read when OpenCV is loaded: set it before starting to read larger images)")
        assert done.stdout.splitlines() == ["100", refusal]


def png_header_only(path, width: int, height: int) -> None:
    """A grey PNG that claims width x height and holds no pixel data: decoders read its header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


def test_opencv_has_the_limit_whichever_module_loads_it_first(tmp_path):
    """gpen.loader loads OpenCV (through detection and paste) before files/images.py: the limit holds."""
    png_header_only(tmp_path / "big.png", 20000, 10001)  # 200.02 MP, under OpenCV's default limit (1073 MP)
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    done = subprocess.run([sys.executable, "-c", OPENCV_CHILD, str(tmp_path / "big.png")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    assert "big.png: over OpenCV's own limit of 200000000 pixels" in done.stdout


def safetensors_listing(path, tensors: int) -> None:
    """A safetensors file whose header lists `tensors` empty float tensors: about 70 bytes each."""
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(tensors))
    header = ("{" + entries + "}").encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def test_a_safetensors_header_of_a_million_tensors_is_refused_by_its_size(tmp_path):
    path = tmp_path / "GPEN-BFR-512.safetensors"
    safetensors_listing(path, 1_000_000)  # once a minute and gigabytes in the library before any check
    assert path.stat().st_size > 50 << 20
    assert_refused_cheaply(path, "has a safetensors header of")


def test_a_safetensors_header_of_too_many_tensors_is_refused_by_their_count(tmp_path):
    path = tmp_path / "GPEN-BFR-512.safetensors"
    safetensors_listing(path, 30_000)  # a 2 MB header: 40 times the largest real network's count
    assert_refused_cheaply(path, "lists 30,000 tensors (real networks have a few hundred, the limit is 20,000)")
