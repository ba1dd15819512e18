"""GPEN blind face restoration: the exact network, checkpoint loading and restoration of face crops.

Usable without ComfyUI:

    import gpen
    model = gpen.load_model("GPEN-BFR-512.pth")      # or .safetensors / .onnx
    restored = model.restore(crops)                   # (B, 512, 512, 3) float 0..1
"""

from .checkpoint import CheckpointError
from .loader import ModelInfo, load_model
from .model import GPEN

__all__ = ["GPEN", "CheckpointError", "ModelInfo", "load_model"]
