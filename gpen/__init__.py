"""GPEN blind face restoration: the exact network, face detection, alignment, restoration and blending.

Usable without ComfyUI:

    import gpen
    model = gpen.load_model("GPEN-BFR-512.pth")                     # or .safetensors / .onnx
    detector = gpen.load_detector("detection_Resnet50_Final.pth")   # or an SCRFD .onnx
    result = gpen.restore_faces(images, model, detector)            # images: (B, H, W, 3) float 0..1
    result.images, result.masks, result.summary
    summary = gpen.restore_video("clip.mp4", "out/clip.mp4", model, detector)  # streamed, audio copied
"""

from .apps.video import VideoSummary, restore_video
from .archs.gpen.network import GPEN
from .faces.align import crop_faces
from .faces.detect import Faces
from .faces.options import MaskOptions, PasteOptions, SelectOptions
from .faces.paste import paste_faces
from .faces.pipeline import (Cancelled, FaceInfo, Restoration, locate_faces, paste_restored, restore_faces,
                             select_faces)
from .faces.stream import restore_frames
from .files.weights import CheckpointError, ModelInfo
from .load import load_detector, load_model, load_parser

__all__ = ["GPEN", "Cancelled", "CheckpointError", "FaceInfo", "Faces", "MaskOptions", "ModelInfo", "PasteOptions",
           "Restoration", "SelectOptions", "VideoSummary", "crop_faces", "load_detector", "load_model", "load_parser",
           "locate_faces", "paste_faces", "paste_restored", "restore_faces", "restore_frames", "restore_video",
           "select_faces"]
