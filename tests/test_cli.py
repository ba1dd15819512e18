"""python -m gpen info / convert / bench, run as a user would."""

import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import gpen
import gpen.files.images
from gpen.files.images import ImageFormat, read_image, write_image
from gpen.loader import describe_weights
from tests.helpers import random_gpen

REPO = Path(__file__).resolve().parents[1]


def run_gpen(*args):
    return subprocess.run([sys.executable, "-m", "gpen", *map(str, args)], cwd=REPO, capture_output=True, text=True)


def test_info_says_what_the_file_is(small_checkpoint):
    done = run_gpen("info", small_checkpoint)
    assert done.returncode == 0, done.stderr
    assert "size: 32" in done.stdout and "channel_multiplier: 1" in done.stdout and "narrow: 0.125" in done.stdout


def test_info_names_a_detector_instead_of_failing(shared):
    done = run_gpen("info", shared / "models" / "retinaface_mobilenet0.25.pth")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("RetinaFace face-detector (pth, float32), mobilenet0.25 backbone")


def test_convert_trust_keeps_the_tensors_of_a_training_checkpoint(tmp_path, small_checkpoint):
    import argparse

    torch.save({"g_ema": torch.load(small_checkpoint, weights_only=True), "args": argparse.Namespace(lr=0.002)},
               tmp_path / "train.pth")
    refused = run_gpen("convert", tmp_path / "train.pth", tmp_path / "GPEN.safetensors")
    assert refused.returncode == 1 and "--trust" in refused.stderr and not (tmp_path / "GPEN.safetensors").exists()
    done = run_gpen("convert", tmp_path / "train.pth", tmp_path / "GPEN.safetensors", "--trust")
    assert done.returncode == 0, done.stderr
    assert gpen.load_model(tmp_path / "GPEN.safetensors", device="cpu").size == 32


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
        same = gpen.load_model(out, device="cpu").network(x) - gpen.load_model(small_checkpoint, device="cpu").network(x)
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
    code = ("import sys, pathlib, gpen.files.catalogue as c; c.CATALOGUE_FILE = pathlib.Path(sys.argv[1]); "
            "from gpen.apps.cli import main; sys.exit(main(sys.argv[2:]))")
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
    assert "broken.png: failed: " in done.stderr and "not a PNG, JPEG, BMP, TIFF or WebP image" in done.stderr
    assert (tmp_path / "out" / "good.png").exists()


def test_run_gpen_style_flags_for_an_aligned_crop(gpen64, tmp_path):
    write_image(tmp_path / "face.png", np.random.rand(64, 64, 3))
    done = run_gpen("restore", "--input", tmp_path / "face.png", "--output", tmp_path / "restored.png",
                    "--model_path", gpen64, "--face_align", "false")
    assert done.returncode == 0, done.stderr
    assert "restored as one aligned face" in done.stdout and (tmp_path / "restored.png").exists()


def test_run_gpen_style_invocation_needs_no_command(shared, gpen64, tmp_path):
    photo, _ = read_image(shared / "images" / "solvay_1927.png")
    write_image(tmp_path / "x.jpg", photo[:300, :600, :3])
    done = run_gpen("--input", tmp_path / "x.jpg", "--output", tmp_path / "y.png", "--model_path", gpen64,
                    "--face_align", "--detector", shared / "models" / "retinaface_mobilenet0.25.pth")
    assert done.returncode == 0, done.stderr
    assert "x.jpg: restored " in done.stdout and read_image(tmp_path / "y.png")[0].shape == (300, 600, 3)


def test_a_size_that_does_not_match_the_model_is_refused(small_checkpoint, tmp_path):
    write_image(tmp_path / "face.png", np.random.rand(32, 32, 3))
    done = run_gpen("--input", tmp_path / "face.png", "--output", tmp_path / "y.png", "--model_path", small_checkpoint,
                    "--size", 2048, "--face_align", "false")
    assert done.returncode == 1 and not (tmp_path / "y.png").exists()
    assert done.stderr == f"error: --size 2048, but {small_checkpoint.name} is a GPEN-32 model\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
@pytest.mark.parametrize("command", ["restore", "bench"])
def test_cuda_asked_of_a_cpu_only_torch_is_one_line(small_checkpoint, tmp_path, command):
    write_image(tmp_path / "face.png", np.random.rand(32, 32, 3))
    args = (tmp_path / "face.png", "-o", tmp_path / "out", "--aligned", "--model", small_checkpoint) \
        if command == "restore" else ("--sizes", 32, "--repeat", 1)
    done = run_gpen(command, *args, "--device", "cuda")
    assert done.returncode == 1 and done.stdout == "" and not (tmp_path / "out").exists()
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: ") and "cuda" in line.lower()


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


# No data loss: these run `python -m gpen` in this process (gpen.apps.cli.main), on aligned random crops.

@pytest.fixture
def gpen_cli(monkeypatch, small_checkpoint):
    """python -m gpen restore --aligned with the small random GPEN; returns the exit status.

    The test process keeps its own allocator (main() tunes glibc for the CLI's process)."""
    from gpen.apps import cli, jobs

    monkeypatch.setattr(jobs, "keep_freed_memory", lambda: None)
    return lambda *args: cli.main(["restore", *map(str, args), "--aligned", "--model", str(small_checkpoint)])


def face(path):
    write_image(path, np.random.rand(32, 32, 3))
    return path


def test_an_input_is_never_overwritten(gpen_cli, tmp_path, capsys):
    album = tmp_path / "album"
    first, second = face(album / "a.png"), face(album / "b.png")
    before = first.read_bytes(), second.read_bytes()
    for args in ([first, "-o", first], [album, "-o", album], [album, "-o", tmp_path / "album" / "."],
                 [album, "-o", album, "--overwrite"]):
        assert gpen_cli(*args) == 1
        assert "is an input; results never replace inputs: choose another -o" in capsys.readouterr().err
    assert (first.read_bytes(), second.read_bytes()) == before and sorted(album.iterdir()) == [first, second]


def test_an_existing_result_is_kept_unless_overwrite_is_given(gpen_cli, tmp_path, capsys):
    source, result = face(tmp_path / "a.png"), tmp_path / "out" / "a.png"
    assert gpen_cli(source, "-o", tmp_path / "out") == 0
    result.write_bytes(b"an earlier result")
    assert gpen_cli(source, "-o", tmp_path / "out") == 0  # nothing failed: the result is there
    out, err = capsys.readouterr()
    assert f"a.png: skipped: {result} exists (--overwrite replaces it)" in out
    assert "1 of 1 file(s) skipped" in err and result.read_bytes() == b"an earlier result"
    assert gpen_cli(source, "-o", tmp_path / "out", "--overwrite") == 0
    assert read_image(result)[0].shape == (32, 32, 3)


def test_same_names_from_different_folders_keep_their_folders(gpen_cli, tmp_path, capsys):
    x, y = face(tmp_path / "x" / "img.png"), face(tmp_path / "y" / "img.png")
    assert gpen_cli(x, y, "-o", tmp_path / "out") == 0
    assert "-> " + str(tmp_path / "out" / "x" / "img.png") in capsys.readouterr().out
    assert (tmp_path / "out" / "x" / "img.png").read_bytes() != (tmp_path / "out" / "y" / "img.png").read_bytes()


def test_a_failed_write_leaves_the_result_that_was_there(gpen_cli, tmp_path, capsys, monkeypatch):
    import errno
    import os

    source, result = face(tmp_path / "a.png"), tmp_path / "out" / "a.png"
    result.parent.mkdir()
    result.write_bytes(b"an earlier result")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    assert gpen_cli(source, "-o", tmp_path / "out", "--overwrite") == 1
    assert "a.png: failed: [Errno 28] No space left on device" in capsys.readouterr().err
    assert result.read_bytes() == b"an earlier result" and list(result.parent.iterdir()) == [result]


def test_ctrl_c_leaves_no_partial_file(gpen_cli, tmp_path, capsys, monkeypatch):
    import os

    def interrupted(*args):
        raise KeyboardInterrupt

    source = face(tmp_path / "a.png")
    monkeypatch.setattr(os, "replace", interrupted)  # Ctrl-C at the last moment of a write
    assert gpen_cli(source, "-o", tmp_path / "out") == 130
    assert capsys.readouterr().err.endswith("cancelled\n") and list((tmp_path / "out").iterdir()) == []


def test_results_follow_the_umask_not_mkstemps_0600(gpen_cli, tmp_path):
    assert gpen_cli(face(tmp_path / "a.png"), "-o", tmp_path / "out") == 0
    assert (tmp_path / "out" / "a.png").stat().st_mode & 0o777 == (tmp_path / "a.png").stat().st_mode & 0o777


def test_an_unwritable_output_is_refused_before_any_model_loads(monkeypatch, tmp_path, capsys):
    from gpen.apps import cli, jobs

    monkeypatch.setattr(jobs, "keep_freed_memory", lambda: None)
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("a file, where -o wants a folder")
    code = cli.main(["restore", str(face(tmp_path / "a.png")), "-o", str(not_a_folder / "out"), "--aligned",
                     "--model", str(tmp_path / "no-such-model.pth")])
    assert code == 1
    assert capsys.readouterr().err == f"error: {not_a_folder / 'out'}: results cannot be written here (Not a directory)\n"


def blank_png(path, width, height):
    """A valid black RGB PNG of any size, written without ever holding its pixels (20000x20000: 5 MB)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    deflate = zlib.compressobj(1)
    rows = bytes((1 + 3 * width) * 100)  # each row: filter byte 0, then black pixels
    idat = b"".join(deflate.compress(rows) for _ in range(height // 100)) + deflate.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def run_watched(*args):
    """python -m gpen in a subprocess, with its exit status, stderr and peak resident memory in MiB.
    The subprocess may not map more than 4 GiB: a regression fails here rather than exhausting the machine."""
    import os
    import resource
    import tempfile

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    with tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen([sys.executable, "-m", "gpen", *map(str, args)], cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=limit_memory)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        peak = usage.ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 1024)
        return child.returncode, stderr.read().decode(), peak


@pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")), reason="memory is watched with wait4")
def test_a_huge_image_is_refused_from_its_header(small_checkpoint, tmp_path):
    huge = blank_png(tmp_path / "huge.png", 20000, 20000)  # decoding it would take 1.2 GB, and 4.8 GB as floats
    code, stderr, peak_mib = run_watched(huge, "-o", tmp_path / "out", "--aligned", "--model", small_checkpoint)
    assert code == 1
    assert f"huge.png: failed: {huge}: 20000x20000 is 400 megapixels, over the 200 MP limit" in stderr
    assert peak_mib < 600  # python, torch and OpenCV take ~260 MiB; the image itself none


def test_the_megapixel_cap_is_an_option(gpen_cli, tmp_path, capsys):
    assert gpen_cli(face(tmp_path / "a.png"), "-o", tmp_path / "out", "--max-megapixels", 0.0001) == 1
    assert "32x32 is 0 megapixels, over the 0.0001 MP limit" in capsys.readouterr().err
    assert gpen_cli(face(tmp_path / "a.png"), "-o", tmp_path / "out", "--max-megapixels", 0) == 0  # 0: no limit


def test_an_image_is_decoded_once(tmp_path, monkeypatch):
    import cv2

    decodes = []
    decode = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *args: decodes.append(args) or decode(*args))
    monkeypatch.setattr(cv2, "imread", None)
    write_image(tmp_path / "gray.png", np.random.rand(8, 8, 1))
    assert read_image(tmp_path / "gray.png")[1] == ImageFormat(1, 8) and len(decodes) == 1


def with_exif_orientation(png: bytes, orientation: int) -> bytes:
    """The PNG with an eXIf chunk (a little-endian TIFF directory holding Orientation) after its IHDR."""
    import struct
    import zlib

    exif = b"II*\0" + struct.pack("<IHHHIH2xI", 8, 1, 0x0112, 3, 1, orientation, 0)
    chunk = struct.pack(">I", len(exif)) + b"eXIf" + exif + struct.pack(">I", zlib.crc32(b"eXIf" + exif))
    return png[:33] + chunk + png[33:]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_opencv_applies_it(tmp_path, orientation):
    import cv2

    pixels = (np.random.rand(6, 10, 3) * 255).astype(np.uint8)
    path = tmp_path / "turned.png"
    path.write_bytes(with_exif_orientation(cv2.imencode(".png", pixels)[1].tobytes(), orientation))
    upright = cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1] / np.float32(255)
    assert np.array_equal(read_image(path)[0], upright)


@pytest.mark.parametrize("suffix", gpen.files.images.IMAGE_SUFFIXES)
def test_the_size_is_read_from_the_header_of_every_file_type(tmp_path, suffix):
    write_image(tmp_path / f"image{suffix}", np.random.rand(30, 70, 3))
    header = gpen.files.images.read_header(tmp_path / f"image{suffix}")
    assert (header.width, header.height) == (70, 30)


def test_selection_and_blending_options_reach_the_pipeline(shared, gpen64, tmp_path):
    photo = shared / "images" / "solvay_1927.png"
    done = restore(shared, gpen64, photo, "-o", tmp_path, "--threshold", 0.6, "--min-size", 10, "--max-faces", 2,
                   "--order", "left-right", "--indices", "1,2,3", "--mask-shape", "ellipse", "--erode", 0.1,
                   "--feather", 0.02, "--color-correction", "--detect-size", 1328)
    assert done.returncode == 0, done.stderr
    assert "solvay_1927.png: restored 2 face(s) in 1 image(s)" in done.stdout


def test_a_bad_option_value_is_refused_once_before_any_work(gpen_cli, tmp_path, capsys):
    assert gpen_cli(face(tmp_path / "a.png"), face(tmp_path / "b.png"), "-o", tmp_path / "out", "--erode", 0.7) == 1
    assert capsys.readouterr().err == "error: erode must be in [0, 0.5) and feather >= 0, got 0.7, 0.011048543456039806\n"
    assert not (tmp_path / "out").exists()
    assert gpen_cli(face(tmp_path / "a.png"), "-o", tmp_path / "out", "--detect-size", "huge") == 1
    assert "detect_size must be 'auto' or a long side in pixels" in capsys.readouterr().err


def test_temporal_smoothing_treats_the_inputs_as_frames(shared, gpen64, tmp_path):
    photo, _ = read_image(shared / "images" / "solvay_1927.png")
    for t in range(3):  # the camera pans two pixels a frame
        write_image(tmp_path / "frames" / f"{t:04d}.png", photo[:240, 2 * t:400 + 2 * t, :3])
    done = restore(shared, gpen64, tmp_path / "frames", "-o", tmp_path / "out", "--temporal-smoothing", 2,
                   "--max-faces", 3)
    assert done.returncode == 0, done.stderr
    assert "finding the faces in 3 frames to steady them over 2 frames" in done.stdout
    assert done.stdout.count("restored 3 face(s) in 1 image(s)") == 3
    write_image(tmp_path / "frames" / "0003.png", photo[:100, :100, :3])
    done = restore(shared, gpen64, tmp_path / "frames", "-o", tmp_path / "out", "--temporal-smoothing", 2)
    assert done.returncode == 1 and "needs frames of one size" in done.stderr


def test_bench_without_an_image_for_the_pipeline_says_so():
    done = run_gpen("bench", "--pipeline", "--device", "cpu")
    assert done.returncode == 1 and done.stderr == "error: bench --pipeline needs --image PHOTO: a photo with several faces\n"


def test_bench_fails_when_a_row_fails(shared):
    plain = run_gpen("bench", "--sizes", 32, "--device", "cpu", "--dtypes", "fp64", "--repeat", 1)
    pipeline = run_gpen("bench", "--pipeline", "--sizes", 32, "--device", "cpu", "--dtypes", "fp64", "--repeat", 1,
                        "--image", shared / "images" / "solvay_1927.png",
                        "--detector", shared / "models" / "retinaface_mobilenet0.25.pth")
    for done in (plain, pipeline):
        assert done.returncode == 1
        assert all("dtype must be one of" in row["error"] for row in json.loads(done.stdout))


def test_restore_a_clip_and_a_photo_in_one_call(shared, gpen64, tmp_path):
    """python -m gpen restore clip.mp4 photo.png -o OUT: one line each, the clip's name kept."""
    pytest.importorskip("av", reason="video needs PyAV (pip install av)")
    from tests.test_video import make_clip, timing

    photo, _ = read_image(shared / "images" / "solvay_1927.png")
    pixels = (photo[..., :3] * 255).round().astype(np.uint8)
    make_clip(tmp_path / "clip.mp4", pixels, frames=6, size=(400, 240))
    write_image(tmp_path / "photo.png", photo[:240, :400, :3])
    done = restore(shared, gpen64, tmp_path / "clip.mp4", tmp_path / "photo.png", "-o", tmp_path / "out",
                   "--max-faces", 2, "--detect-size", 640)
    assert done.returncode == 0, done.stderr
    assert "[1/2] clip.mp4: 6 frames, 12 faces restored, " in done.stdout
    assert f" s -> {tmp_path / 'out' / 'clip.mp4'}\n" in done.stdout
    assert "[2/2] photo.png: restored 2 face(s) in 1 image(s)" in done.stdout
    assert timing(tmp_path / "out" / "clip.mp4") == timing(tmp_path / "clip.mp4")


def readme_api_example() -> str:
    """The Python code of the README's "Python API" section."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Python API\n"):]
    section = section[:section.index("\n## ", 1)]
    return "\n".join(block.split("```", 1)[0] for block in section.split("```python\n")[1:])


def test_the_readme_api_example_runs_as_written_on_a_cpu(shared, gpen64, tmp_path):
    """With random weights of each kind at the paths `python -m gpen download` uses, and small pictures."""
    pytest.importorskip("av", reason="the example restores a clip: PyAV (pip install av)")
    from tests.test_video import make_clip

    models = tmp_path / "models"
    for source, target in [(gpen64, "facerestore_models/GPEN-BFR-512.pth"),
                           (shared / "models" / "retinaface_mobilenet0.25.pth",
                            "facedetection/detection_mobilenet0.25_Final.pth"),
                           (shared / "fixtures" / "bisenet_random_fp16.pth", "facedetection/parsing_bisenet.pth"),
                           (shared / "fixtures" / "srvgg_x4_random.pth", "upscale_models/realesr-general-x4v3.pth")]:
        (models / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, models / target)
    photo, _ = read_image(shared / "images" / "solvay_1927.png")
    group = photo[:150, :320, :3]
    write_image(tmp_path / "photo.jpg", group)
    write_image(tmp_path / "before_swap.jpg", group)
    write_image(tmp_path / "swapped.jpg", np.concatenate([group[:, :160], group[:, 160:, ::-1]], axis=1))
    make_clip(tmp_path / "clip.mp4", (group * 255).round().astype(np.uint8), frames=4, size=(300, 150), step=2)
    (tmp_path / "example.py").write_text(readme_api_example())
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert read_image(tmp_path / "restored.png")[0].shape == group.shape
    assert (tmp_path / "out" / "clip.mp4").exists() and "restored" in done.stdout


# A new user's first runs.

def test_a_folder_is_restored_with_its_subfolders(gpen_cli, tmp_path, capsys):
    album = tmp_path / "album"
    face(album / "a.png"), face(album / "2020" / "b.png"), face(album / "2020" / "summer" / "c.png")
    face(album / ".thumbnails" / "a.png")
    assert gpen_cli(album, "-o", tmp_path / "out") == 0
    out, err = capsys.readouterr()
    restored = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert restored == ["2020/b.png", "2020/summer/c.png", "a.png"] and "[3/3]" in out
    assert f"{album / '.thumbnails'}: skipped: a hidden folder" in err


def test_an_output_folder_inside_the_input_folder_is_not_restored_again(gpen_cli, tmp_path, capsys):
    album = tmp_path / "album"
    face(album / "a.png")
    assert gpen_cli(album, "-o", album / "restored") == 0
    assert gpen_cli(album, "-o", album / "restored", "--overwrite") == 0
    assert f"{album / 'restored'}: skipped: the output folder (-o)" in capsys.readouterr().err
    assert sorted(album.rglob("*.png")) == [album / "a.png", album / "restored" / "a.png"]


def test_a_file_name_for_several_results_is_refused(gpen_cli, tmp_path, capsys):
    a, b = face(tmp_path / "a.png"), face(tmp_path / "b.png")
    assert gpen_cli(a, b, "-o", tmp_path / "two.png") == 1
    assert capsys.readouterr().err == (f"error: -o {tmp_path / 'two.png'} names an image file, but there are 2 "
                                       "inputs: give a folder for their results\n")
    assert gpen_cli(a, "-o", tmp_path / "out.mp4") == 1
    assert capsys.readouterr().err == (f"error: -o {tmp_path / 'out.mp4'} names a video file, but {a} is an image: "
                                       "give an image file name (.png) or a folder\n")
    assert sorted(tmp_path.iterdir()) == [a, b]  # no folder named two.png or out.mp4


def test_convert_keeps_float16_and_never_writes_over_what_is_there(tmp_path, small_checkpoint):
    half, again = tmp_path / "half.safetensors", tmp_path / "again.safetensors"
    assert run_gpen("convert", small_checkpoint, half, "--half").returncode == 0
    assert run_gpen("convert", half, again).returncode == 0
    assert describe_weights(again).dtype == "float16"  # not widened to float32 unasked
    assert run_gpen("convert", half, tmp_path / "wide.safetensors", "--dtype", "fp32").returncode == 0
    assert describe_weights(tmp_path / "wide.safetensors").dtype == "float32"
    kept = run_gpen("convert", small_checkpoint, again)
    assert kept.returncode == 0 and kept.stderr == f"skipped: {again} exists (--overwrite replaces it)\n"
    assert describe_weights(again).dtype == "float16"
    assert run_gpen("convert", small_checkpoint, again, "--overwrite").returncode == 0
    assert describe_weights(again).dtype == "float32"
    before = half.read_bytes()
    for flags in ((), ("--overwrite",)):
        itself = run_gpen("convert", half, half, "--dtype", "fp32", *flags)
        assert itself.returncode == 1 and "is the input; results never replace inputs" in itself.stderr
    assert half.read_bytes() == before


def test_info_into_a_pipe_its_reader_closed_exits_quietly(small_checkpoint):
    """What `gpen info FILE | head -1` does when head has gone before the output is written."""
    child = subprocess.Popen([sys.executable, "-m", "gpen", "info", small_checkpoint], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # the reader has gone
    stderr = child.stderr.read().decode()
    assert child.wait() == 141 and stderr == ""  # as a tool stopped by SIGPIPE: 128 + 13, and no message


def test_a_span_past_the_clips_end_says_so(gpen64, detector, tmp_path):
    pytest.importorskip("av", reason="video needs PyAV (pip install av)")
    from tests.test_video import make_clip

    make_clip(tmp_path / "clip.mp4", frames=6)
    model = gpen.load_model(gpen64, device="cpu")
    summary = gpen.restore_video(tmp_path / "clip.mp4", tmp_path / "part.mp4", model, detector, span=range(0, 1500))
    assert "span 0:1500 runs past the clip's end: it has 6 frames, 0:6 restored" in str(summary)
    assert summary.frames == 6
    with pytest.raises(ValueError, match=r"clip.mp4: span 10:20 starts outside the clip's 6 frames \(0:6\)$"):
        gpen.restore_video(tmp_path / "clip.mp4", tmp_path / "late.mp4", model, detector, span=range(10, 20))
    assert not (tmp_path / "late.mp4").exists()


def test_every_model_is_checked_before_any_is_loaded(monkeypatch, tmp_path, capsys, gpen64, shared):
    from gpen.apps import cli, jobs

    monkeypatch.setattr(jobs, "keep_freed_memory", lambda: None)
    loaded = []
    monkeypatch.setattr(jobs, "load_model", lambda *args, **kwargs: loaded.append(args))
    photo = face(tmp_path / "a.png")
    for flags, says in [(["--detector", tmp_path / "none.pth"], f"{tmp_path / 'none.pth'}: no such file"),
                        (["--detector", gpen64], f"{gpen64}: holds GPEN weights, not a detector; face detectors "),
                        (["--parser", gpen64], f"{gpen64}: holds GPEN weights, not a parser (--parser)"),
                        (["--upscale", 2, "--upscaler", gpen64], "holds GPEN weights, not an upscaler (--upscaler)"),
                        (["--size", 512], f"--size 512, but {gpen64.name} is a GPEN-64 model")]:
        detector = ["--detector", shared / "models" / "retinaface_mobilenet0.25.pth"]
        code = cli.main(["restore", str(photo), "-o", str(tmp_path / "out"), "--model", str(gpen64),
                         *map(str, detector + flags)])  # the last --detector counts
        assert code == 1 and says in capsys.readouterr().err
    assert loaded == []


def test_a_detector_that_cannot_be_had_offers_the_small_one(gpen64, tmp_path):
    write_image(tmp_path / "face.png", np.random.rand(64, 64, 3))
    done = run_with_catalogue(tmp_path, "http://127.0.0.1:9",  # nothing listens on the discard port
                              "restore", tmp_path / "face.png", "-o", tmp_path / "out", "--model", gpen64,
                              "--models-dir", tmp_path / "models")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: detection_Resnet50_Final.pth is not in {tmp_path / 'models' / 'facedetection'}")
    assert line.endswith("; or use the 2 MB detector: --detector retinaface_mobilenet0.25 "
                         "(python -m gpen download retinaface_mobilenet0.25 fetches it)")


def test_bench_pipeline_says_what_it_is_timing(shared):
    done = run_gpen("bench", "--pipeline", "--sizes", 32, "--device", "cpu", "--dtypes", "fp64", "--repeat", 1,
                    "--image", shared / "images" / "solvay_1927.png",
                    "--detector", shared / "models" / "retinaface_mobilenet0.25.pth")
    assert done.stderr.splitlines() == [
        "[1/2] 1080p, one face: GPEN-32 fp64, rotations none, 1 run(s) after a warm-up",
        "[2/2] solvay_1927.png, 29 faces: GPEN-32 fp64, rotations none, 1 run(s) after a warm-up"]
    assert len(json.loads(done.stdout)) == 2
