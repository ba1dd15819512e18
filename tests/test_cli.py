"""python -m gpen info / convert / bench, run as a user would."""

import json
import subprocess
import sys
from pathlib import Path

import torch

import gpen

REPO = Path(__file__).resolve().parents[1]


def run_gpen(*args):
    return subprocess.run([sys.executable, "-m", "gpen", *map(str, args)], cwd=REPO, capture_output=True, text=True)


def test_info_says_what_the_file_is(small_checkpoint):
    done = run_gpen("info", small_checkpoint)
    assert done.returncode == 0, done.stderr
    assert "size: 32" in done.stdout and "channel_multiplier: 1" in done.stdout and "narrow: 0.125" in done.stdout


def test_info_on_a_bad_file_is_one_clear_line(tmp_path):
    (tmp_path / "x.pth").write_text("hello")
    done = run_gpen("info", tmp_path / "x.pth")
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: {tmp_path / 'x.pth'}: is a text file, not weights; it starts with 'hello'"


def test_convert_to_safetensors_keeps_the_output(tmp_path, small_checkpoint):
    out = tmp_path / "GPEN.safetensors"
    assert run_gpen("convert", small_checkpoint, out).returncode == 0
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        same = gpen.load_model(out, device="cpu")(x) - gpen.load_model(small_checkpoint, device="cpu")(x)
    assert same.abs().max() == 0
    assert run_gpen("convert", small_checkpoint, tmp_path / "half.safetensors", "--half").returncode == 0
    assert gpen.load_model(tmp_path / "half.safetensors", device="cpu").info.dtype == "float16"


def test_bench_prints_one_json_table():
    done = run_gpen("bench", "--sizes", "32", "--device", "cpu", "--repeat", "1")
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert {"size", "device", "dtype", "batch", "ms_per_face", "peak_memory_mib"} <= set(row)
    assert row["size"] == 32 and row["ms_per_face"] > 0
