"""Run this pack's SEGS and BBOX_DETECTOR nodes with the real Impact Pack in a real ComfyUI server.

Not part of the test suite (which must not need the Impact Pack). Run it after changing the SEGS nodes:

    python scripts/check_impact_pack.py --comfyui ~/ComfyUI --impact-pack ~/ComfyUI-Impact-Pack \\
        --python ~/impact-venv/bin/python

One-time setup (this script installs nothing): a ComfyUI checkout, a ComfyUI-Impact-Pack checkout, and a
Python (--python) with ComfyUI's requirements, this pack's and the Impact Pack's requirements.txt, e.g.

    python -m venv --system-site-packages ~/impact-venv
    ~/impact-venv/bin/pip install -r ~/ComfyUI-Impact-Pack/requirements.txt
    ~/impact-venv/bin/pip install --no-deps spandrel kornia kornia_rs   # a CPU-only torch: keep it

(The Impact Pack pins numpy<2: keep it out of the Python the tests run on.)

What it does:
1. Makes, once, and keeps in the temp folder (comfyui-gpen-impact-check-cache): a random-weight SD1.5
   checkpoint (ComfyUI's own SD1.5 classes, fp16 .safetensors, 2 GB) and, without --gpen, a random-weight
   GPEN-BFR-512 in the released files' key layout (the pack's own network, as the tests make them).
2. Makes a throwaway ComfyUI base directory in --out: models/ links to those files and to the detector,
   input/ gets the image (and a 768 px wide copy for FaceDetailer), custom_nodes/ComfyUI-GPEN links to
   this checkout, and custom_nodes/ComfyUI-Impact-Pack is a copy of --impact-pack (without .git): the
   Impact Pack writes its settings into its own folder, and a placeholder Subpack may have to go there.
   Nothing is written to your ComfyUI folders, your Impact Pack or this checkout (bytecode and ComfyUI's
   database go into the base too).
   - The Impact Pack imports its Subpack (ComfyUI-Impact-Subpack, in impact_subpack/) unconditionally; the
     Subpack needs ultralytics. Where the copy has no Subpack, or --python cannot import ultralytics, the
     copy gets an empty placeholder Subpack (no nodes), and the script says so.
   - ComfyUI and the Impact Pack import torchvision. Where --python cannot import it (a CPU-only torch with
     no CPU torchvision build at hand), the server gets a stand-in on its PYTHONPATH (written into the base
     directory) whose every name raises when used: the Impact Pack's mask blurring then fails, so every
     Impact node here runs with feather 0. --extra-pythonpath DIR (repeatable) and $PYTHONPATH reach the
     server too.
3. Starts ComfyUI (<comfyui>/main.py --cpu) on 127.0.0.1 at a free port; its log goes to out/server.log.
   Waits for /object_info and checks that this pack's nodes and the Impact Pack's used here are registered.
4. Queues the prompts of the PROMPTS table and waits for each on /history; the images they save are copied
   into --out, the histories written there. The checks, each a line per measure (PASS/FAIL, what was measured),
   the first saying whether the prompt ran:
   - impact_baseline: the Impact Pack alone (Make Tile SEGS -> SEGSPaste, SEGS to MASK), so that a broken
     Impact install is told apart from a broken node of ours;
   - facedetailer: Impact's FaceDetailer with GPEN Face Detector for FaceDetailer on the random SD1.5
     (1 step, cfg 1, guide_size 128, max_size 256, feather 0) on a 768 px wide copy: an image of the
     input's size, as many faces detailed as BBOX Detector (SEGS) finds with the same settings, and pixels
     changed only inside FaceDetailer's mask;
   - segs_paste: BBOX Detector (SEGS) with our detector finds the photo's faces (29 in the 1927 Solvay
     photo), GPEN Restore SEGS restores as many, Impact's SEGSPaste of its segments changes the image only
     inside them (SEGS to MASK) and gives exactly GPEN Restore SEGS's own image;
   - faces_to_segs: Detect and Crop Faces -> Faces to SEGS gives a segment per face, and SEGSPaste of them
     (their cropped_image is the image itself) gives the image back unchanged;
   - filters: Impact's label, range and ordered filters (take 3) between BBOX Detector (SEGS) and GPEN
     Restore SEGS: each filter's count, and 3 faces restored;
   - segs_to_faces: the same filtered segments into Detect Faces in SEGS (GPEN) -> GPEN Restore Faces ->
     Paste Faces Back (GPEN): 3 faces, changed only inside Paste Faces Back's mask.
   - frames: a batch of 2 frames -> Detect and Crop Faces -> Faces to SEGS (one SEGS a frame, a list) ->
     the ordered filter (run by ComfyUI once a frame) -> GPEN Restore SEGS on the batch: 3 faces a frame.
5. Exit status 0 only when every check passed.

Options: --detector (default ../shared/models/retinaface_mobilenet0.25.pth), --gpen (a GPEN file instead of
the random one), --image (default ../shared/images/solvay_1927.png), --faces (how many faces the image
holds; default 29 for the Solvay photo, else not checked), --only NAME (a check, repeatable), --timeout
(seconds per prompt), --port. Environment: COMFYUI_PATH, IMPACT_PACK_PATH and COMFYUI_PYTHON stand for
--comfyui, --impact-pack and --python.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.dont_write_bytecode = True  # leave no __pycache__ in the checkout (scripts/comfyui_server.py)
from comfyui_server import Server, logger

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CACHE = Path(tempfile.gettempdir()) / "comfyui-gpen-impact-check-cache"
SOLVAY_FACES = 29  # the 1927 Solvay photo's faces; the small RetinaFace finds them all at its own threshold
SMALL_WIDTH = 768  # FaceDetailer runs SD on every face: a smaller copy keeps that to a few minutes on a CPU
SD15_FILE = "sd15_random_fp16.safetensors"
GPEN_FILE = "GPEN-BFR-512-random.pth"
TAKE = 3  # faces the ordered filter keeps
FRAMES = 2  # the frames check's batch

GPEN_NODES = ("GPENLoadModel", "GPENLoadFaceDetector", "GPENDetectAndCropFaces", "GPENRestoreFaces",
              "GPENPasteFacesBack", "GPENFaceDetectorForFaceDetailer", "GPENRestoreSEGS", "GPENFacesToSEGS",
              "GPENSEGSToFaces")
IMPACT_NODES = ("FaceDetailer", "BboxDetectorSEGS", "SEGSPaste", "SegsToCombinedMask", "ImpactSEGSLabelFilter",
                "ImpactSEGSRangeFilter", "ImpactSEGSOrderedFilter", "ImpactCount_Elts_in_SEGS")

# The random checkpoint: ComfyUI's SD1.5 model classes at SD1.5's sizes, every float tensor N(0, 0.02), saved
# through the model config's own key conversion, so CheckpointLoaderSimple reads it as any SD1.5 file.
SD15_BUILDER = """
import sys
import torch
sys.path.insert(0, ".")
out, sys.argv[1:] = sys.argv[1], ["--cpu"]
import comfy.options
comfy.options.enable_args_parsing()  # as main.py does: comfy.model_management reads --cpu when imported
import comfy.sd1_clip, comfy.supported_models, comfy.utils
from comfy.ldm.models.autoencoder import AutoencoderKL

UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "dtype": torch.float16, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False}
VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
       "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
torch.manual_seed(0)
model = comfy.supported_models.SD15(UNET).get_model({}, device="cpu")
clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float16)
vae = AutoencoderKL(ddconfig=VAE, embed_dim=4).half()
with torch.no_grad():
    for network in (model.diffusion_model, clip, vae):
        for tensor in (*network.parameters(), *network.buffers()):
            if tensor.is_floating_point():
                tensor.normal_(0, 0.02)
state = model.state_dict_for_saving(clip.state_dict(), vae.state_dict())
state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
comfy.utils.save_torch_file(state, out)
"""

# GPEN-BFR-512's configuration (shared/fixtures/gpen_bfr_512_keys.json), random as the tests' random_gpen.
GPEN_BUILDER = """
import sys
import torch
sys.path.insert(0, ".")
from tests.helpers import random_gpen
torch.save(random_gpen(512, channel_multiplier=2, narrow=1.0).state_dict(), sys.argv[1])
"""

TORCHVISION_STAND_IN = '''\
"""A stand-in for torchvision written by ComfyUI-GPEN's scripts/check_impact_pack.py: any torchvision module
imports, and every name in it raises when used."""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0-stand-in"


class _Missing:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision is not installed (the stand-in of check_impact_pack.py)")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Missing


class _Modules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        return importlib.machinery.ModuleSpec(name, self, is_package=True) if name.startswith("torchvision.") else None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__getattr__ = __getattr__
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Modules())
'''

SUBPACK_PLACEHOLDER = '''\
"""A placeholder for the Impact Subpack, written by ComfyUI-GPEN's scripts/check_impact_pack.py into a
throwaway copy of the Impact Pack: the Subpack needs ultralytics, and its nodes are not used there."""
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
'''


log = logger("impact-check")


# ------------------------------------------------------------------------------------------ files

def cached(name: str, build) -> Path:
    """CACHE/name, made by build(path) the first time (into a .partial file, so a killed run leaves none)."""
    path = CACHE / name
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        log(f"making {path} (once; kept for later runs)")
        build(partial)
        partial.replace(path)
    return path


def run_python(args, code: str, cwd: Path, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([args.python, "-c", code, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          check=False)


def build_with(args, code: str, cwd: Path, env: dict):
    def build(path: Path) -> None:
        done = run_python(args, code, cwd, str(path), env=env)
        if done.returncode != 0 or not path.exists():
            raise RuntimeError(f"making {path.name} failed:\n{done.stderr[-3000:]}")
    return build


def server_pythonpath(args, base: Path) -> tuple[str, list[str]]:
    """The server's PYTHONPATH, and notes on what stands in for what could not be imported."""
    paths = [str(p) for p in args.extra_pythonpath]
    paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    probe = run_python(args, "import torchvision.transforms.functional", args.comfyui,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(paths)))
    if probe.returncode == 0:
        return os.pathsep.join(paths), []
    stand_in = base / "python"
    (stand_in / "torchvision").mkdir(parents=True)
    (stand_in / "torchvision" / "__init__.py").write_text(TORCHVISION_STAND_IN)
    reason = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "no torchvision"
    return os.pathsep.join([str(stand_in), *paths]), [f"torchvision: a stand-in whose names raise ({reason})"]


def copy_impact_pack(args, custom_nodes: Path) -> list[str]:
    """The Impact Pack copied into custom_nodes; notes on the Subpack placeholder if one was needed."""
    target = custom_nodes / "ComfyUI-Impact-Pack"
    shutil.copytree(args.impact_pack, target, ignore=shutil.ignore_patterns(".git"), symlinks=True)
    subpack = target / "impact_subpack" / "impact" / "subpack_nodes.py"
    if subpack.exists():
        probe = run_python(args, "import ultralytics", args.comfyui)
        if probe.returncode == 0:
            return []
        reason = f"ultralytics does not import: {probe.stderr.strip().splitlines()[-1]}"
        shutil.rmtree(target / "impact_subpack")
    else:
        reason = "the Impact Pack has no impact_subpack/"
    subpack.parent.mkdir(parents=True)
    subpack.write_text(SUBPACK_PLACEHOLDER)
    return [f"Impact Subpack: an empty placeholder, no nodes ({reason})"]


def make_base(args, out: Path) -> tuple[Path, list[str]]:
    base = out / "comfyui-base"
    shutil.rmtree(base, ignore_errors=True)
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True)
    (base / "custom_nodes" / "ComfyUI-GPEN").symlink_to(ROOT, target_is_directory=True)
    notes = copy_impact_pack(args, base / "custom_nodes")
    image = Image.open(args.image).convert("RGB")
    image.save(base / "input" / "photo.png")
    small = image.resize((SMALL_WIDTH, round(image.height * SMALL_WIDTH / image.width)), Image.LANCZOS)
    small.save(base / "input" / "photo_small.png")
    return base, notes


def link_models(base: Path, models: dict[str, Path]) -> None:
    for folder, source in models.items():
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        (base / "models" / folder / source.name).symlink_to(source.resolve())


# ------------------------------------------------------------------------------------------ server

def start_server(args, base: Path, out: Path, pythonpath: str) -> Server:
    """ComfyUI with this base, the server's PYTHONPATH, and its database in the base where ComfyUI has
    --database-url (else it keeps it in <comfyui>/user, whatever the base directory)."""
    database = []
    if "--database-url" in (args.comfyui / "comfy" / "cli_args.py").read_text():
        database = ["--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}"]
    return Server(args.comfyui, args.python, base, out / "server.log", log=log, port=args.port,
                  extra_args=database, env={"PYTHONPATH": pythonpath})


# ------------------------------------------------------------------------------------------ prompts
# A prompt is {node name: (class, inputs)}; an input ("name", k) is output k of that node. Widgets left out
# take their defaults from /object_info, so these list only what matters.

def detector_nodes(files: dict) -> dict:
    return {"detector": ("GPENLoadFaceDetector", {"detector_name": files["detector"], "device": "cpu"}),
            "bbox_detector": ("GPENFaceDetectorForFaceDetailer", {"face_detector": ("detector", 0), "threshold": 0.0,
                                                                  "segment_mask": "box"})}


def bbox_segs(image: str) -> dict:
    return {"segs": ("BboxDetectorSEGS", {"bbox_detector": ("bbox_detector", 0), "image": (image, 0),
                                          "threshold": 0.5, "dilation": 10, "crop_factor": 3.0, "drop_size": 10,
                                          "labels": "all"})}


def gpen_nodes(files: dict) -> dict:
    return {"gpen": ("GPENLoadModel", {"model_name": files["gpen"], "precision": "fp32", "device": "cpu"})}


def mask_image(name: str, mask: tuple) -> dict:
    """A MASK saved as a grey image, for the measures."""
    return {f"{name}_image": ("MaskToImage", {"mask": mask}),
            f"{name}_save": ("SaveImage", {"images": (f"{name}_image", 0), "filename_prefix": name})}


def count(name: str, segs: tuple) -> dict:
    return {name: ("ImpactCount_Elts_in_SEGS", {"segs": segs}), f"{name}_show": ("PreviewAny", {"source": (name, 0)})}


def impact_baseline_prompt(files: dict) -> dict:
    """The Impact Pack alone (tiles as segments): whether it works in this ComfyUI at all."""
    return {
        "image": ("LoadImage", {"image": "photo.png"}),
        "tiles": ("ImpactMakeTileSEGS", {"images": ("image", 0), "bbox_size": 256, "crop_factor": 1.0}),
        **count("found", ("tiles", 0)),
        "paste": ("SEGSPaste", {"image": ("image", 0), "segs": ("tiles", 0), "feather": 0, "alpha": 255}),
        "save": ("SaveImage", {"images": ("paste", 0), "filename_prefix": "impact_baseline"}),
        "segs_mask": ("SegsToCombinedMask", {"segs": ("tiles", 0)}),
        **mask_image("segs_mask", ("segs_mask", 0)),
    }


def facedetailer_prompt(files: dict) -> dict:
    return {
        "image": ("LoadImage", {"image": "photo_small.png"}),
        "checkpoint": ("CheckpointLoaderSimple", {"ckpt_name": files["sd15"]}),
        "positive": ("CLIPTextEncode", {"text": "a face, photo", "clip": ("checkpoint", 1)}),
        "negative": ("CLIPTextEncode", {"text": "", "clip": ("checkpoint", 1)}),
        **detector_nodes(files),
        "detailer": ("FaceDetailer", {
            "image": ("image", 0), "model": ("checkpoint", 0), "clip": ("checkpoint", 1), "vae": ("checkpoint", 2),
            "positive": ("positive", 0), "negative": ("negative", 0), "bbox_detector": ("bbox_detector", 0),
            "guide_size": 128, "guide_size_for": True, "max_size": 256, "seed": 0, "steps": 1, "cfg": 1.0,
            "sampler_name": "euler", "scheduler": "normal", "denoise": 0.5, "feather": 0, "noise_mask": True,
            "force_inpaint": True, "bbox_threshold": 0.5, "bbox_dilation": 10, "bbox_crop_factor": 3.0,
            "drop_size": 10, "wildcard": "", "cycle": 1, "noise_mask_feather": 0}),
        "save": ("SaveImage", {"images": ("detailer", 0), "filename_prefix": "facedetailer"}),
        "refined_save": ("SaveImage", {"images": ("detailer", 1), "filename_prefix": "facedetailer_refined"}),
        **bbox_segs("image"), **count("found", ("segs", 0)),  # what FaceDetailer's own detection gives it
        **mask_image("detailer_mask", ("detailer", 3)),
    }


def segs_paste_prompt(files: dict) -> dict:
    return {
        "image": ("LoadImage", {"image": "photo.png"}),
        **detector_nodes(files), **bbox_segs("image"), **gpen_nodes(files), **count("found", ("segs", 0)),
        # feather 0 in both, so that SEGSPaste of the restored segs must give GPEN Restore SEGS's image exactly
        "restore": ("GPENRestoreSEGS", {"image": ("image", 0), "segs": ("segs", 0), "gpen_model": ("gpen", 0),
                                        "face_detector": ("detector", 0), "feather": 0}),
        "summary": ("PreviewAny", {"source": ("restore", 3)}),
        "paste": ("SEGSPaste", {"image": ("image", 0), "segs": ("restore", 1), "feather": 0, "alpha": 255}),
        "save": ("SaveImage", {"images": ("paste", 0), "filename_prefix": "segs_paste"}),
        "restored_save": ("SaveImage", {"images": ("restore", 0), "filename_prefix": "restore_segs"}),
        "segs_mask": ("SegsToCombinedMask", {"segs": ("restore", 1)}),
        **mask_image("segs_mask", ("segs_mask", 0)),
    }


def faces_to_segs_prompt(files: dict) -> dict:
    return {
        "image": ("LoadImage", {"image": "photo.png"}),
        "detector": ("GPENLoadFaceDetector", {"detector_name": files["detector"], "device": "cpu"}),
        "faces": ("GPENDetectAndCropFaces", {"image": ("image", 0), "face_detector": ("detector", 0)}),
        "summary": ("PreviewAny", {"source": ("faces", 3)}),
        "to_segs": ("GPENFacesToSEGS", {"face_info": ("faces", 1), "image": ("image", 0), "crop_factor": 3.0,
                                        "dilation": 10, "drop_size": 10, "segment_mask": "box"}),
        **count("found", ("to_segs", 0)),
        "paste": ("SEGSPaste", {"image": ("image", 0), "segs": ("to_segs", 0), "feather": 0, "alpha": 255}),
        "save": ("SaveImage", {"images": ("paste", 0), "filename_prefix": "faces_to_segs_paste"}),
        "segs_mask": ("SegsToCombinedMask", {"segs": ("to_segs", 0)}),
        **mask_image("segs_mask", ("segs_mask", 0)),
    }


def filtered_segs(files: dict) -> dict:
    """BBOX Detector (SEGS) with our detector, then Impact's three filters: the label filter keeps faces,
    the range filter every area, the ordered filter the TAKE largest."""
    return {
        "image": ("LoadImage", {"image": "photo.png"}),
        **detector_nodes(files), **bbox_segs("image"), **gpen_nodes(files), **count("found", ("segs", 0)),
        "by_label": ("ImpactSEGSLabelFilter", {"segs": ("segs", 0), "preset": "all", "labels": "face"}),
        "by_range": ("ImpactSEGSRangeFilter", {"segs": ("by_label", 0), "target": "area(=w*h)", "mode": True,
                                               "min_value": 0, "max_value": 67108864}),
        "by_order": ("ImpactSEGSOrderedFilter", {"segs": ("by_range", 0), "target": "area(=w*h)", "order": True,
                                                 "take_start": 0, "take_count": TAKE}),
        **count("labelled", ("by_label", 0)), **count("in_range", ("by_range", 0)), **count("taken", ("by_order", 0)),
    }


def filters_prompt(files: dict) -> dict:
    return {
        **filtered_segs(files),
        "restore": ("GPENRestoreSEGS", {"image": ("image", 0), "segs": ("by_order", 0), "gpen_model": ("gpen", 0),
                                        "face_detector": ("detector", 0)}),
        "summary": ("PreviewAny", {"source": ("restore", 3)}),
        "save": ("SaveImage", {"images": ("restore", 0), "filename_prefix": "filters_restore_segs"}),
        **mask_image("restore_mask", ("restore", 2)),
    }


def segs_to_faces_prompt(files: dict) -> dict:
    return {
        **filtered_segs(files),
        "faces": ("GPENSEGSToFaces", {"image": ("image", 0), "segs": ("by_order", 0), "face_detector": ("detector", 0),
                                      "gpen_model": ("gpen", 0)}),
        "faces_summary": ("PreviewAny", {"source": ("faces", 3)}),
        "restore": ("GPENRestoreFaces", {"gpen_model": ("gpen", 0), "crops": ("faces", 0)}),
        "paste": ("GPENPasteFacesBack", {"image": ("image", 0), "restored": ("restore", 0), "face_info": ("faces", 1)}),
        "summary": ("PreviewAny", {"source": ("paste", 2)}),
        "save": ("SaveImage", {"images": ("paste", 0), "filename_prefix": "segs_to_faces_paste"}),
        **mask_image("paste_mask", ("paste", 1)),
    }


def frames_prompt(files: dict) -> dict:
    """Video frames: a batch of FRAMES copies of the photo -> Detect and Crop Faces -> Faces to SEGS (a list,
    one SEGS per frame) -> Impact's ordered filter, which ComfyUI runs once per frame -> GPEN Restore SEGS on
    the batch, pairing frame t with SEGS t."""
    return {
        "image": ("LoadImage", {"image": "photo.png"}),
        "frames": ("RepeatImageBatch", {"image": ("image", 0), "amount": FRAMES}),
        "detector": ("GPENLoadFaceDetector", {"detector_name": files["detector"], "device": "cpu"}),
        **gpen_nodes(files),
        "faces": ("GPENDetectAndCropFaces", {"image": ("frames", 0), "face_detector": ("detector", 0)}),
        "to_segs": ("GPENFacesToSEGS", {"face_info": ("faces", 1), "image": ("frames", 0)}),
        "by_order": ("ImpactSEGSOrderedFilter", {"segs": ("to_segs", 0), "target": "area(=w*h)", "order": True,
                                                 "take_start": 0, "take_count": TAKE}),
        "restore": ("GPENRestoreSEGS", {"image": ("frames", 0), "segs": ("by_order", 0), "gpen_model": ("gpen", 0)}),
        "summary": ("PreviewAny", {"source": ("restore", 3)}),
        "save": ("SaveImage", {"images": ("restore", 0), "filename_prefix": "frames_restore_segs"}),
    }


def api_prompt(graph: dict, info: dict) -> dict:
    """The API form: links as [node, output]; every required widget not given takes its default."""
    prompt = {}
    for name, (class_type, given) in graph.items():
        inputs = {}
        for input_name, spec in info[class_type]["input"].get("required", {}).items():
            kind, settings = spec[0], (spec[1] if len(spec) > 1 else {})
            if input_name not in given and (isinstance(kind, list) or kind in ("INT", "FLOAT", "BOOLEAN", "STRING")):
                inputs[input_name] = settings.get("default", kind[0] if isinstance(kind, list) else "")
        for input_name, value in given.items():
            inputs[input_name] = [value[0], value[1]] if isinstance(value, tuple) else value
        prompt[name] = {"class_type": class_type, "inputs": inputs}
    return prompt


# ------------------------------------------------------------------------------------------ measures

class Result:
    """A finished prompt: its images (as float arrays) and the texts its Preview Any nodes show."""

    def __init__(self, history: dict, base: Path, out: Path, check: str):
        self.status = history["status"]
        self.outputs = history.get("outputs", {})
        self.base, self.out, self.check = base, out, check

    @property
    def ok(self) -> bool:
        return self.status.get("status_str") == "success"

    def error(self) -> str:
        for kind, message in self.status.get("messages", []):
            if kind == "execution_error":
                return (f"{message.get('node_type')}: {message.get('exception_type')}: "
                        f"{message.get('exception_message', '').strip()}")
        return self.status.get("status_str", "no status")

    def image(self, node: str, index: int = 0) -> np.ndarray:
        saved = self.outputs[node]["images"][index]
        path = self.base / "output" / saved["subfolder"] / saved["filename"]
        shutil.copyfile(path, self.out / f"{self.check}_{node}{f'_{index}' if index else ''}.png")
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)

    def text(self, node: str) -> str:
        return self.outputs[node]["text"][0]

    def number(self, node: str) -> int:
        return int(self.text(node))


def input_image(base: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(base / "input" / name).convert("RGB"), dtype=np.int16)


def faces_in(summary: str) -> int:
    """The face count in a summary's headline: "restored 3 face(s) in 1 image(s)", "29 face(s) cropped",
    "restored 29 face(s) in 29 segment(s) of 1 image"."""
    found = re.search(r"(\d+) face\(s\)", summary.splitlines()[0] if summary else "")
    return int(found.group(1)) if found else -1


def changed_only_inside(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> tuple[bool, str]:
    """Whether `after` differs from `before` only where `mask` (a saved grey image) is on, and by how much.
    Outside, 1/255 is allowed: a soft mask's edge below half a step saves as 0 yet can round a pixel."""
    difference = np.abs(after - before).max(axis=-1)
    inside = mask[..., 0] > 0
    outside_max = int(difference[~inside].max()) if (~inside).any() else 0
    inside_mean = float(difference[inside].mean()) if inside.any() else 0.0
    return (outside_max <= 1 and inside_mean > 0,
            f"mask covers {float(inside.mean()):.1%}; mean change inside {inside_mean:.1f}/255, largest outside "
            + f"{outside_max}/255")


# ------------------------------------------------------------------------------------------ checks
# Each check returns [(PASS?, what was measured)]; the first line says whether the prompt ran.

def check_impact_baseline(r: Result, base: Path, faces: int | None) -> list:
    tiles, mask = r.number("found_show"), r.image("segs_mask_save")
    largest = int(np.abs(r.image("save") - input_image(base, "photo.png")).max())
    covered = float((mask[..., 0] > 0).mean())
    return [(tiles > 0 and mask.min() > 0, f"Make Tile SEGS made {tiles} tile(s), SEGS to MASK covers {covered:.1%}"),
            (largest == 0, f"SEGSPaste of image-less tiles leaves the image: largest change {largest}/255")]


def check_facedetailer(r: Result, base: Path, faces: int | None) -> list:
    before = input_image(base, "photo_small.png")
    after = r.image("save")
    inside, measured = changed_only_inside(before, after, r.image("detailer_mask_save"))
    sizes = f"saved {after.shape[1]}x{after.shape[0]}, input {before.shape[1]}x{before.shape[0]}"
    found, refined = r.number("found_show"), len(r.outputs["refined_save"]["images"])
    return [(after.shape == before.shape, sizes),
            (refined == found > 0,
             f"detailed {refined} face(s) (cropped_refined); BBOX Detector (SEGS) with the same settings finds "
             + f"{found} in the {SMALL_WIDTH} px copy"),
            (inside, f"changed only inside FaceDetailer's mask: {measured}")]


def check_segs_paste(r: Result, base: Path, faces: int | None) -> list:
    found, restored = r.number("found_show"), faces_in(r.text("summary"))
    before = input_image(base, "photo.png")
    pasted, restored_image = r.image("save"), r.image("restored_save")
    same = int(np.abs(pasted - restored_image).max()) if pasted.shape == restored_image.shape else -1
    inside, measured = changed_only_inside(before, pasted, r.image("segs_mask_save"))
    return [(faces is None or found == faces, f"BBOX Detector (SEGS) found {found} segment(s)"
                                              + (f", the photo has {faces}" if faces else "")),
            (restored == found, f"GPEN Restore SEGS restored {restored}: {r.text('summary').splitlines()[0]}"),
            (inside, f"SEGSPaste changed the image only inside the segments: {measured}"),
            (same == 0, f"SEGSPaste of GPEN Restore SEGS's segs gives its image: largest difference {same}/255")]


def check_faces_to_segs(r: Result, base: Path, faces: int | None) -> list:
    cropped, segments = faces_in(r.text("summary")), r.number("found_show")
    before, after = input_image(base, "photo.png"), r.image("save")
    mask = r.image("segs_mask_save")
    largest = int(np.abs(after - before).max())
    return [(segments == cropped and (faces is None or cropped == faces),
             f"Detect and Crop Faces cropped {cropped}, Faces to SEGS made {segments} segment(s)"),
            (largest == 0, f"SEGSPaste of them gives the image back: largest change {largest}/255"),
            (mask.max() > 0, f"SEGS to MASK covers {float((mask[..., 0] > 0).mean()):.1%} of the image")]


def filter_counts(r: Result, faces: int | None) -> list:
    found, labelled, in_range, taken = (r.number(f"{n}_show") for n in ("found", "labelled", "in_range", "taken"))
    return [(faces is None or found == faces, f"BBOX Detector (SEGS) found {found}"),
            (labelled == found and in_range == found and taken == min(TAKE, found),
             f"SEGS Filter (label: face) kept {labelled}, (range: any area) {in_range}, "
             + f"(ordered: take {TAKE}) {taken}")]


def check_filters(r: Result, base: Path, faces: int | None) -> list:
    restored = faces_in(r.text("summary"))
    before = input_image(base, "photo.png")
    inside, measured = changed_only_inside(before, r.image("save"), r.image("restore_mask_save"))
    return [*filter_counts(r, faces),
            (restored == TAKE, f"GPEN Restore SEGS restored {restored}: {r.text('summary').splitlines()[0]}"),
            (inside, f"changed only inside its mask: {measured}")]


def check_segs_to_faces(r: Result, base: Path, faces: int | None) -> list:
    cropped, pasted = faces_in(r.text("faces_summary")), faces_in(r.text("summary"))
    before = input_image(base, "photo.png")
    inside, measured = changed_only_inside(before, r.image("save"), r.image("paste_mask_save"))
    return [*filter_counts(r, faces),
            (cropped == TAKE and pasted == TAKE,
             f"Detect Faces in SEGS cropped {cropped}, Paste Faces Back pasted {pasted}: "
             + r.text("summary").splitlines()[0]),
            (inside, f"changed only inside Paste Faces Back's mask: {measured}")]


def check_frames(r: Result, base: Path, faces: int | None) -> list:
    summary = r.text("summary")
    restored, saved = faces_in(summary), len(r.outputs["save"]["images"])
    before = input_image(base, "photo.png")
    changed = [int(np.abs(r.image("save", k) - before).max()) for k in range(saved)]
    return [(restored == TAKE * FRAMES and f"of {FRAMES} frames" in summary,
             f"GPEN Restore SEGS restored {restored} with one SEGS a frame: {summary.splitlines()[0]}"),
            (saved == FRAMES and all(changed), f"{saved} frames saved, each restored: largest change {changed}/255")]


PROMPTS = {  # check name -> (prompt, measures)
    "impact_baseline": (impact_baseline_prompt, check_impact_baseline),
    "facedetailer": (facedetailer_prompt, check_facedetailer),
    "segs_paste": (segs_paste_prompt, check_segs_paste),
    "faces_to_segs": (faces_to_segs_prompt, check_faces_to_segs),
    "filters": (filters_prompt, check_filters),
    "segs_to_faces": (segs_to_faces_prompt, check_segs_to_faces),
    "frames": (frames_prompt, check_frames),
}


# ------------------------------------------------------------------------------------------ main

def report(passed: bool, check: str, measured: str) -> bool:
    print(f"{'PASS' if passed else 'FAIL'} {check}: {measured}", flush=True)
    return passed


def run_check(server: Server, info: dict, check: str, files: dict, args, base: Path, out: Path) -> bool:
    make_prompt, measure = PROMPTS[check]
    graph = make_prompt(files)
    missing = sorted({class_type for class_type, _ in graph.values()} - set(info))
    if missing:
        return report(False, check, f"not registered: {', '.join(missing)}")
    began = time.time()
    try:
        result = Result(server.run(api_prompt(graph, info), args.timeout), base, out, check)
    except (TimeoutError, RuntimeError) as e:
        return report(False, check, str(e))
    (out / f"{check}.history.json").write_text(json.dumps({"status": result.status, "outputs": result.outputs},
                                                          indent=1))
    if not report(result.ok, check, f"ran in {time.time() - began:.0f} s" if result.ok else result.error()):
        return False
    lines = [report(passed, check, measured) for passed, measured in measure(result, base, args.faces)]
    return all(lines)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_PATH"),
                   help="ComfyUI checkout (folder with main.py); default $COMFYUI_PATH")
    p.add_argument("--impact-pack", type=Path, default=os.environ.get("IMPACT_PACK_PATH"),
                   help="ComfyUI-Impact-Pack checkout; default $IMPACT_PACK_PATH")
    p.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON", sys.executable),
                   help="the Python that runs ComfyUI; default $COMFYUI_PYTHON or this one")
    p.add_argument("--detector", type=Path, default=SHARED / "models" / "retinaface_mobilenet0.25.pth",
                   help="a RetinaFace .pth (default ../shared/models/retinaface_mobilenet0.25.pth)")
    p.add_argument("--gpen", type=Path, help="a GPEN file (default: a random-weight GPEN-BFR-512, made once)")
    p.add_argument("--image", type=Path, default=SHARED / "images" / "solvay_1927.png",
                   help="the photo (default ../shared/images/solvay_1927.png)")
    p.add_argument("--faces", type=int, help=f"faces in --image (default {SOLVAY_FACES} for the Solvay photo, "
                                             f"else not checked)")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "comfyui-gpen-impact-check",
                   help="server log, images, histories (default: comfyui-gpen-impact-check in the temp folder)")
    p.add_argument("--extra-pythonpath", type=Path, action="append", default=[],
                   help="a folder put on the server's PYTHONPATH (repeatable), e.g. a torchvision stand-in")
    p.add_argument("--only", action="append", choices=list(PROMPTS), help="run this check only (repeatable)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per prompt")
    p.add_argument("--ready-timeout", type=float, default=300, help="seconds for ComfyUI to start")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    if not args.comfyui or not (args.comfyui / "main.py").exists():
        p.error("--comfyui (or COMFYUI_PATH) must name a ComfyUI folder with main.py")
    if not args.impact_pack or not (args.impact_pack / "__init__.py").exists():
        p.error("--impact-pack (or IMPACT_PACK_PATH) must name a ComfyUI-Impact-Pack checkout")
    for option in ("detector", "gpen", "image"):
        path = getattr(args, option)
        if path is not None and not path.is_file():
            p.error(f"--{option}: no such file: {path}")
    args.comfyui, args.impact_pack = args.comfyui.resolve(), args.impact_pack.resolve()
    if args.faces is None and args.image.name.startswith("solvay_1927"):
        args.faces = SOLVAY_FACES
    return args


def main() -> int:
    args = parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in (path for check in PROMPTS for path in out.glob(f"{check}_*.png")):  # an earlier run's, only
        old.unlink()
    base, notes = make_base(args, out)
    pythonpath, stand_ins = server_pythonpath(args, base)
    for note in notes + stand_ins:
        log(f"not installed here: {note}")
    build_env = dict(os.environ, PYTHONPATH=pythonpath, PYTHONPYCACHEPREFIX=str(CACHE / "pycache"))
    sd15 = cached(SD15_FILE, build_with(args, SD15_BUILDER, args.comfyui, build_env))
    gpen_file = args.gpen or cached(GPEN_FILE, build_with(args, GPEN_BUILDER, ROOT, build_env))
    link_models(base, {"checkpoints": sd15, "facerestore_models": gpen_file, "facedetection": args.detector})
    files = {"sd15": sd15.name, "gpen": gpen_file.name, "detector": args.detector.name}
    server = start_server(args, base, out, pythonpath)
    results = []
    try:
        info = server.wait_ready("/object_info", args.ready_timeout)
        for group, ids in (("ComfyUI-GPEN", GPEN_NODES), ("Impact Pack", IMPACT_NODES)):
            missing = [i for i in ids if i not in info]
            results.append(report(not missing, "registered", f"{group}: " + (f"missing {', '.join(missing)}"
                                                                             if missing else f"{len(ids)} node ids")))
        for check in args.only or PROMPTS:
            log(f"queueing {check}")
            results.append(run_check(server, info, check, files, args, base, out))
    finally:
        server.stop()
    log(f"server log, images and histories in {out}")
    print(f"{sum(results)} of {len(results)} checks passed" + ("" if all(results) else " (FAIL lines above)"))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
