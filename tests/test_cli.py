"""python -m gpen info / convert / bench, run as a user would."""

import contextlib
import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import gpen
from gpen.io import ImageFormat, read_image, write_image
from tests.helpers import random_gpen

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


@contextlib.contextmanager
def file_server(directory):
    """A local HTTP server (127.0.0.1) for the files in directory; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


def run_with_catalogue(tmp_path, base_url, *args):
    """python -m gpen with the catalogue's downloads pointed at base_url."""
    catalogue = json.loads((REPO / "models" / "catalogue.json").read_text())
    for entry in catalogue["models"]:
        entry["url"] = f"{base_url}/{entry['file']}"
    (tmp_path / "catalogue.json").write_text(json.dumps(catalogue))
    code = ("import sys, pathlib, gpen.catalogue as c; c.CATALOGUE_FILE = pathlib.Path(sys.argv[1]); "
            "from gpen.cli import main; sys.exit(main(sys.argv[2:]))")
    return subprocess.run([sys.executable, "-c", code, tmp_path / "catalogue.json", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True)


@pytest.fixture(scope="module")
def gpen64(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "GPEN-random-64.pth"
    torch.save(random_gpen(64, 1, 0.125).state_dict(), path)
    return path


def restore(shared, gpen64, *args):
    return run_gpen("restore", *args, "--model", gpen64, "--detector", shared / "models" / "retinaface_mobilenet0.25.pth")


def test_restore_a_photo(shared, gpen64, tmp_path):
    done = restore(shared, gpen64, shared / "images" / "solvay_1927.png", "-o", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "solvay_1927.png: restored 29 face(s) in 1 image(s)" in done.stdout
    out, fmt = read_image(tmp_path / "solvay_1927.png")
    assert out.shape == (568, 1328, 4) and fmt.bits == 8  # the photo is an RGBA PNG, and stays one


def test_restore_keeps_16_bit_depth_grayscale_and_alpha(shared, gpen64, tmp_path):
    photo, _ = read_image(shared / "images" / "solvay_1927.png")
    crop = photo[:300, :600, :3]
    write_image(tmp_path / "in" / "deep.png", crop, ImageFormat(3, 16))
    write_image(tmp_path / "in" / "gray.png", crop.mean(-1, keepdims=True), ImageFormat(1, 8))
    write_image(tmp_path / "in" / "alpha.png", np.concatenate([crop, np.full_like(crop[..., :1], 0.5)], -1))
    done = restore(shared, gpen64, tmp_path / "in", "-o", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert read_image(tmp_path / "out" / "deep.png")[1] == ImageFormat(3, 16)
    assert read_image(tmp_path / "out" / "gray.png")[1] == ImageFormat(1, 8)
    alpha, fmt = read_image(tmp_path / "out" / "alpha.png")
    assert fmt.channels == 4 and np.allclose(alpha[..., 3], 0.5, atol=1 / 255)


def test_a_bad_file_fails_alone_with_its_reason(shared, gpen64, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.png").write_text("not an image")
    shutil.copy(shared / "images" / "solvay_1927.png", tmp_path / "in" / "good.png")
    done = restore(shared, gpen64, str(tmp_path / "in" / "*.png"), "-o", tmp_path / "out")
    assert done.returncode == 1
    assert "broken.png: failed: " in done.stderr and "not an image OpenCV can read" in done.stderr
    assert (tmp_path / "out" / "good.png").exists()


def test_run_gpen_style_flags_for_an_aligned_crop(gpen64, tmp_path):
    write_image(tmp_path / "face.png", np.random.rand(64, 64, 3))
    done = run_gpen("restore", "--input", tmp_path / "face.png", "--output", tmp_path / "restored.png",
                    "--model_path", gpen64, "--face_align", "false")
    assert done.returncode == 0, done.stderr
    assert "restored as one aligned face" in done.stdout and (tmp_path / "restored.png").exists()


def test_a_missing_model_that_cannot_be_downloaded_says_where_to_put_it(tmp_path):
    write_image(tmp_path / "face.png", np.random.rand(64, 64, 3))
    done = run_with_catalogue(tmp_path, "http://127.0.0.1:9",  # nothing listens on the discard port
                              "restore", tmp_path / "face.png", "-o", tmp_path / "out", "--aligned",
                              "--models-dir", tmp_path / "models")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: GPEN-BFR-512.pth is not in {tmp_path / 'models' / 'facerestore_models'}")
    assert "Download it from http://127.0.0.1:9/GPEN-BFR-512.pth and put it in that folder." in line


def test_a_named_model_is_downloaded_on_first_use(gpen64, tmp_path):
    (tmp_path / "site").mkdir()
    shutil.copy(gpen64, tmp_path / "site" / "GPEN-BFR-512.pth")
    write_image(tmp_path / "face.png", np.random.rand(64, 64, 3))
    args = ("restore", tmp_path / "face.png", "-o", tmp_path / "out", "--aligned", "--model", "GPEN-BFR-512",
            "--models-dir", tmp_path / "models")
    with file_server(tmp_path / "site") as url:
        first = run_with_catalogue(tmp_path, url, *args)
    assert first.returncode == 0, first.stderr
    downloaded = tmp_path / "models" / "facerestore_models" / "GPEN-BFR-512.pth"
    assert downloaded.read_bytes() == gpen64.read_bytes()
    assert run_with_catalogue(tmp_path, "http://127.0.0.1:9", *args).returncode == 0  # no network needed now


def test_download_command_fetches_catalogue_files_into_their_folders(shared, tmp_path):
    (tmp_path / "site").mkdir()
    shutil.copy(shared / "models" / "retinaface_mobilenet0.25.pth", tmp_path / "site" / "detection_mobilenet0.25_Final.pth")
    with file_server(tmp_path / "site") as url:
        done = run_with_catalogue(tmp_path, url, "download", "retinaface_mobilenet0.25", "--models-dir", tmp_path / "models")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "models" / "facedetection" / "detection_mobilenet0.25_Final.pth").stat().st_size == 1789735
