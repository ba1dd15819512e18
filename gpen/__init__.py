"""GPEN blind face restoration: the exact network, face detection, alignment, restoration and blending.

Usable without ComfyUI:

    import gpen
    model = gpen.load_model("GPEN-BFR-512.pth")                     # or .safetensors / .onnx
    detector = gpen.load_detector("detection_Resnet50_Final.pth")   # or an SCRFD .onnx
    result = gpen.restore_faces(images, model, detector)            # images: (B, H, W, 3) float 0..1
    result.images, result.masks, result.summary
    summary = gpen.restore_video("clip.mp4", "out/clip.mp4", model, detector)  # streamed, audio copied
"""

from .align import crop_faces
from .blend import paste_faces
from .checkpoint import CheckpointError
from .detection import Faces, load_detector
from .loader import ModelInfo, load_model
from .model import GPEN
from .parsing import load_parser
from .pipeline import Cancelled, FaceInfo, Restoration, locate_faces, restore_faces, select_faces
from .video import VideoSummary, restore_frames, restore_video

__all__ = ["GPEN", "Cancelled", "CheckpointError", "FaceInfo", "Faces", "ModelInfo", "Restoration", "VideoSummary",
           "crop_faces", "load_detector", "load_model", "load_parser", "locate_faces", "paste_faces", "restore_faces", "restore_frames",
           "restore_video", "select_faces"]
