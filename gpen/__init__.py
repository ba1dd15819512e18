"""GPEN blind face restoration: the exact network, face detection, alignment, restoration and blending.

Usable without ComfyUI:

    import gpen
    model = gpen.load_model("GPEN-BFR-512.pth")                     # or .safetensors / .onnx
    detector = gpen.load_detector("detection_Resnet50_Final.pth")   # or an SCRFD .onnx
    result = gpen.restore_faces(images, model, detector)            # images: (B, H, W, 3) float 0..1
    result.images, result.masks, result.summary
    summary = gpen.restore_video("clip.mp4", "out/clip.mp4", model, detector)  # streamed, audio copied

The names below are imported on first use, so that `python -m gpen --help` starts without torch.
"""

import importlib
import os

# OpenCV reads its decoders' pixel limit once, when it is loaded, and several of our modules load it: so
# it is set here, before any of them runs, to files/images.py's MAX_MEGAPIXELS unless the user set one.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", "200000000")

# Each public name and the module that defines it.
_HOMES = {
    "VideoSummary": "apps.video", "probe_video": "apps.video", "restore_video": "apps.video",
    "register": "archs",
    "GPEN": "archs.gpen.network",
    "ArchSpec": "archs.spec", "Convention": "archs.spec", "ModelInfo": "archs.spec",
    "crop_faces": "faces.align",
    "Detector": "faces.detect", "Faces": "faces.detect",
    "Parser": "faces.parse", "parse_faces": "faces.parse",
    "MaskOptions": "faces.options", "PasteOptions": "faces.options", "SegmentOptions": "faces.options",
    "SelectOptions": "faces.options",
    "paste_faces": "faces.paste",
    "Cancelled": "faces.pipeline", "FaceInfo": "faces.pipeline", "Restoration": "faces.pipeline",
    "locate_faces": "faces.pipeline", "paste_restored": "faces.pipeline", "restore_faces": "faces.pipeline",
    "select_faces": "faces.pipeline",
    "Restorer": "faces.restore",
    "SEG": "faces.segs", "FaceSegmentDetector": "faces.segs", "info_to_segs": "faces.segs",
    "locate_faces_in_segs": "faces.segs", "restore_segs": "faces.segs",
    "UpscalerHandle": "faces.upscale",
    "restore_frames": "faces.stream",
    "download": "files.download",
    "read_image": "files.images", "write_image": "files.images",
    "CheckpointError": "files.weights", "read_state_dict": "files.weights",
    "load": "loader", "load_detector": "loader", "load_model": "loader", "load_parser": "loader",
    "load_upscaler": "loader",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'gpen' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
