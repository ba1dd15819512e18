"""Our models under a real ComfyUI's memory manager: GPEN Face Restore is queued, queued again (another
strength, so it runs again while the loaders' outputs are reused), then POST /free {"unload_models": true}
(the "Free model and node cache" button's first half), then queued a third time. One PASS/FAIL line per
step, from ComfyUI's own log lines (--verbose DEBUG): "Requested to load GPENPackNetwork" when one of ours
goes to the device, "Unloading GPENPackNetwork" when ComfyUI moves one off.

Expected: the first run loads two (GPEN and the detector), the second none, /free unloads both, the third
loads both again. Each run also tells ComfyUI the working memory it needs beyond the weights
(load_models_gpu's memory_required, as ComfyUI's VAE decode does): a probe custom node in the base wraps
load_models_gpu and logs what our nodes pass ("load_models_gpu: GPENPackNetwork,GPENPackNetwork
memory_required=N"), which must equal gpen.faces.run_memory.run_working_bytes for the run's image and
models, computed here. The server runs with --cpu (scripts/comfyui_server.py), where ComfyUI's device is
the CPU: the same bookkeeping as on a GPU, without the VRAM (so nothing is freed for the working memory).
A throwaway --base-directory holds a random GPEN-64, the small RetinaFace, a crop of the Solvay photo and
the probe; your ComfyUI and this checkout stay untouched.

    python scripts/check_node_memory.py --comfyui ~/ComfyUI --python ~/ComfyUI/venv/bin/python
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import torch
from comfyui_server import Server, http, logger

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
from gpen import load_detector, load_model
from gpen.faces.run_memory import run_working_bytes
from tests.helpers import random_gpen

LOADED, UNLOADED = "Requested to load GPENPackNetwork", "Unloading GPENPackNetwork"
ASKED = re.compile(r"load_models_gpu: GPENPackNetwork,GPENPackNetwork memory_required=(\d+)")
PHOTO_SHAPE = (1, 260, 360, 3)  # the crop of the photo LoadImage gives: a few faces
FACE_BATCH = 4
# A custom node with no nodes: it wraps ComfyUI's load_models_gpu to log what each request asks for.
PROBE = """import logging
import comfy.model_management as mm

_load_models_gpu = mm.load_models_gpu


def load_models_gpu(models, memory_required=0, *args, **kwargs):
    logging.info("load_models_gpu: %s memory_required=%d", ",".join(type(m.model).__name__ for m in models),
                 memory_required)
    return _load_models_gpu(models, memory_required, *args, **kwargs)


mm.load_models_gpu = load_models_gpu
NODE_CLASS_MAPPINGS = {}
"""
log = logger("memory")


def prompt(strength: float) -> dict:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
            "2": {"class_type": "GPENLoadModel", "inputs": {"model_name": "GPEN-random-64.pth", "precision": "auto",
                                                            "device": "auto"}},
            "3": {"class_type": "GPENLoadFaceDetector", "inputs": {
                "detector_name": "detection_mobilenet0.25_Final.pth", "device": "auto", "detect_size": "auto",
                "rotations": "none"}},
            "4": {"class_type": "GPENFaceRestore", "inputs": {
                "image": ["1", 0], "gpen_model": ["2", 0], "face_detector": ["3", 0], "face_batch": FACE_BATCH,
                "threshold": 0.0, "min_size": 0, "max_faces": 0, "order": "largest", "indices": "",
                "temporal_smoothing": 0.0, "strength": strength, "mask_shape": "ellipse", "feather": 0.02,
                "erode": 0.05, "color_correction": True}},
            "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}}


def make_base(base: Path, detector: Path, image: Path) -> None:
    shutil.rmtree(base, ignore_errors=True)
    for sub in ("custom_nodes", "input", "output", "temp", "user", "models/facerestore_models",
                "models/facedetection"):
        (base / sub).mkdir(parents=True)
    (base / "custom_nodes" / "ComfyUI-GPEN").symlink_to(ROOT, target_is_directory=True)
    (base / "custom_nodes" / "memory_probe").mkdir()
    (base / "custom_nodes" / "memory_probe" / "__init__.py").write_text(PROBE)
    torch.save(random_gpen(64, 1, 0.125).state_dict(), base / "models/facerestore_models/GPEN-random-64.pth")
    shutil.copy(detector, base / "models/facedetection/detection_mobilenet0.25_Final.pth")
    cv2.imwrite(str(base / "input" / "photo.png"), cv2.imread(str(image))[:PHOTO_SHAPE[1], :PHOTO_SHAPE[2]])


def expected_working_bytes(base: Path) -> int:
    """What GPEN Face Restore should ask for: the library's count for the same models (fp32 on the CPU, as
    precision auto loads them there) and image."""
    model = load_model(base / "models/facerestore_models/GPEN-random-64.pth", device="cpu")
    detector = load_detector(base / "models/facedetection/detection_mobilenet0.25_Final.pth", device="cpu")
    return run_working_bytes(PHOTO_SHAPE, model, detector, face_batch=FACE_BATCH)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI checkout")
    p.add_argument("--python", default=sys.executable, help="the Python that runs ComfyUI")
    p.add_argument("--detector", type=Path, default=SHARED / "models" / "retinaface_mobilenet0.25.pth")
    p.add_argument("--image", type=Path, default=SHARED / "images" / "solvay_1927.png")
    p.add_argument("--extra-pythonpath", default="", help="put on the server's PYTHONPATH, e.g. a torchvision stand-in")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "comfyui-gpen-memory-check")
    p.add_argument("--timeout", type=float, default=600, help="seconds per prompt")
    args = p.parse_args()

    make_base(args.out / "base", args.detector, args.image)
    expected_bytes = expected_working_bytes(args.out / "base")
    env = {"PYTHONPATH": args.extra_pythonpath} if args.extra_pythonpath else None
    server = Server(args.comfyui, args.python, args.out / "base", args.out / "server.log", log=log,
                    extra_args=["--verbose", "DEBUG"], env=env)
    read = 0

    def new_lines() -> str:
        nonlocal read
        text = (args.out / "server.log").read_text()
        text, read = text[read:], len(text)
        return text

    def run(strength: float) -> str:
        return server.run(prompt(strength), args.timeout)["status"]["status_str"]

    def free_models() -> str:
        status = http(server.url + "/free", {"unload_models": True})[0]
        time.sleep(5)  # the idle prompt worker wakes on the flag and unloads at once
        return "success" if status == 200 else f"HTTP {status}"

    steps = [("run 1 loads GPEN and the detector", lambda: run(1.0), LOADED, 2),
             ("run 2 loads nothing", lambda: run(0.9), LOADED, 0),
             ("/free unload_models unloads both", free_models, UNLOADED, 2),
             ("run 3 loads both again", lambda: run(0.8), LOADED, 2)]
    failed = 0
    try:
        server.wait_ready("/system_stats", 300)
        new_lines()
        for name, step, line, expected in steps:
            status = step()
            text = new_lines()
            seen = text.count(line)
            ok = seen == expected and status == "success"
            failed += not ok
            log(f"{'PASS' if ok else 'FAIL'} {name}: {seen} x '{line}' (expected {expected}), {status}")
            if name.startswith("run"):
                asked = [int(n) for n in ASKED.findall(text)]
                ok = asked == [expected_bytes]
                failed += not ok
                log(f"{'PASS' if ok else 'FAIL'} {name.split()[0]} {name.split()[1]} asks for its working memory: "
                    f"memory_required {asked} (expected [{expected_bytes}], run_working_bytes)")
    finally:
        server.stop()
    log(f"server log: {args.out / 'server.log'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
