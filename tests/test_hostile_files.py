"""Small files that claim huge networks are refused quickly, before anything their size is allocated.

Each file is loaded in a fresh Python whose heap is capped at 1 GiB above what importing gpen takes,
so a regression fails here instead of filling the machine; the child reports how much its peak
resident memory grew and how long the refusal took.
"""

import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

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
