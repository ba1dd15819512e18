"""The GPEN nodes (ComfyUI's V1 node API). Each is a thin shell over the gpen library."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

import torch

from .. import gpen
from ..gpen.align import TEMPLATES
from ..gpen.blend import GPEN_ERODE, GPEN_FEATHER, MASK_SHAPES
from ..gpen.pipeline import ORDERS, locate_faces
from ..gpen.loader import resolve_dtype
from ..gpen.restorer import restore_aligned
from . import host

CATEGORY = "GPEN"
_CACHE: OrderedDict = OrderedDict()  # (path, mtime, dtype) -> loaded object, the last few kept


def _cached(key, load):
    if key not in _CACHE:
        _CACHE[key] = load()
        while len(_CACHE) > 2:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return _CACHE[key]


def _detection_options(required: dict) -> dict:
    required.update({
        "threshold": ("FLOAT", {"default": 0.5, "min": 0.05, "max": 1.0, "step": 0.01,
                                "tooltip": "Minimum detector confidence for a face."}),
        "min_size": ("INT", {"default": 0, "min": 0, "max": 4096,
                             "tooltip": "Ignore faces whose box is smaller than this (pixels)."}),
        "max_faces": ("INT", {"default": 0, "min": 0, "max": 1000,
                              "tooltip": "Restore at most this many faces per frame (0: all)."}),
        "order": (list(ORDERS), {"default": "largest", "tooltip": "How faces are numbered in each frame."}),
        "indices": ("STRING", {"default": "", "tooltip": "Only these faces, by number in that order, e.g. '0,2' (empty: all)."}),
        "temporal_smoothing": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.5,
                                         "tooltip": "For video frames: steadies landmarks across frames "
                                                    "(Gaussian width in frames; 0 is off)."}),
    })
    return required


def _paste_options(required: dict) -> dict:
    required.update({
        "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                               "tooltip": "How much of the restored face replaces the original (GPEN's alpha)."}),
        "mask_shape": (list(MASK_SHAPES), {"default": "box", "tooltip": "box: GPEN's feathered square; "
                                                                         "ellipse: an oval around the face."}),
        "feather": ("FLOAT", {"default": round(GPEN_FEATHER, 4), "min": 0.0, "max": 0.2, "step": 0.001,
                              "tooltip": "Softness of the mask edge, as a fraction of the face crop."}),
        "erode": ("FLOAT", {"default": round(GPEN_ERODE, 4), "min": 0.0, "max": 0.45, "step": 0.005,
                            "tooltip": "How far the mask stays inside the crop edge, as a fraction of it."}),
        "color_correction": ("BOOLEAN", {"default": False, "tooltip": "Match the restored face's colours "
                                                                       "to the original (mean and std in Lab)."}),
    })
    return required


class LoadGPENModel:
    DESCRIPTION = "Loads a GPEN face restoration model (GPEN-BFR-256/512/1024/2048: .pth, .safetensors or .onnx)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("GPEN_MODEL",)
    OUTPUT_TOOLTIPS = ("The GPEN model, for GPEN Restore Faces or GPEN Face Restore.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (host.gpen_model_files(), {"tooltip": "A GPEN file from models/facerestore_models or models/gpen."}),
            "precision": (["auto", "fp32", "fp16", "bf16"], {"default": "auto",
                          "tooltip": "auto: fp16 on a GPU, fp32 on the CPU. ONNX files keep their own."}),
            "device": (["auto", "cpu", "gpu"], {"default": "auto", "tooltip": "Where the model runs; auto follows ComfyUI."}),
        }}

    def load(self, model_name: str, precision: str, device: str):
        path = host.find_gpen_file(model_name)
        target = host.torch_device(device)
        dtype = resolve_dtype(precision, target)
        key = (path, os.path.getmtime(path), dtype, target.type == "cpu")
        # Torch models wait on the offload device and visit the GPU per run; onnxruntime picks its own.
        home = target if path.lower().endswith(".onnx") else host.offload_device()
        model = _cached(key, lambda: gpen.load_model(path, device=home, dtype=dtype))
        size = sum(p.numel() * p.element_size() for p in model.parameters()) if isinstance(model, torch.nn.Module) else 0
        return (host.Loaded(model, target, size),)


class LoadFaceDetector:
    DESCRIPTION = "Loads a face detector: RetinaFace (resnet50 or mobilenet0.25 .pth) or insightface SCRFD (.onnx)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FACE_DETECTOR",)
    OUTPUT_TOOLTIPS = ("The face detector, for Detect and Crop Faces or GPEN Face Restore.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "detector_name": (host.detector_files(), {"tooltip": "From models/facedetection, or SCRFD from models/insightface."}),
            "device": (["auto", "cpu", "gpu"], {"default": "auto", "tooltip": "Where detection runs; auto follows ComfyUI."}),
            "detect_size": ("STRING", {"default": "auto", "tooltip": "auto: finds faces from ~16 px to the whole "
                                       "frame (close-ups and 2048 portraits included); or a long side in pixels "
                                       "to detect at, e.g. 1024."}),
        }}

    def load(self, detector_name: str, device: str, detect_size: str = "auto"):
        path = host.find_detector_file(detector_name)
        target = host.torch_device(device)
        detect_size = detect_size.strip() or "auto"
        key = (path, os.path.getmtime(path), target.type, detect_size)
        detector = _cached(key, lambda: gpen.load_detector(path, device=target if detector_name.startswith("insightface/")
                                                            else "cpu", detect_size=detect_size))
        return (host.Loaded(detector, target),)


class DetectAndCropFaces:
    DESCRIPTION = "Finds faces in each frame and cuts them out aligned to GPEN's template, for any face restorer."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "FACE_INFO", "MASK")
    RETURN_NAMES = ("crops", "face_info", "face_mask")
    OUTPUT_TOOLTIPS = ("Aligned face crops, one per face across all frames.",
                       "Where each crop came from, for Paste Faces Back.",
                       "The area of each frame the faces cover.")
    FUNCTION = "detect"

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "image": ("IMAGE", {"tooltip": "One image or a batch of video frames."}),
            "face_detector": ("FACE_DETECTOR", {"tooltip": "From Load Face Detector."}),
            "crop_size": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64,
                                  "tooltip": "Size of the crops (ignored when a GPEN model is connected: its size is used)."}),
            "template": (list(TEMPLATES), {"default": "gpen", "tooltip": "gpen: the alignment GPEN was trained with; "
                                                                         "ffhq: facexlib's, as GFPGAN/CodeFormer use."}),
        }
        return {"required": _detection_options(required),
                "optional": {"gpen_model": ("GPEN_MODEL", {"tooltip": "Take the crop size from this model."})}}

    def detect(self, image, face_detector, crop_size, template, threshold, min_size, max_faces, order, indices,
               temporal_smoothing, gpen_model=None):
        size = gpen_model.model.size if gpen_model is not None else crop_size
        with face_detector as detector:
            crops, info = locate_faces(image, detector, size, template=template, cancel=host.Progress.cancel,
                                       threshold=threshold, min_size=min_size, max_faces=max_faces, order=order,
                                       indices=indices, temporal_sigma=temporal_smoothing)
            _, masks = gpen.paste_faces(image[..., :1], crops, info.affines, info.frames,
                                        smooth_small_faces=False, device=info.device)
        logging.info("[GPEN] %s", "; ".join([f"{len(crops)} face(s) cropped", *info.selection.notes()]))
        return (crops.cpu(), info, masks)


class GPENRestoreFaces:
    DESCRIPTION = "Restores aligned face crops with GPEN (crops from Detect and Crop Faces or from other packs)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("restored",)
    OUTPUT_TOOLTIPS = ("The restored crops, same size as the input crops.",)
    FUNCTION = "restore"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "gpen_model": ("GPEN_MODEL", {"tooltip": "From Load GPEN Model."}),
            "crops": ("IMAGE", {"tooltip": "Aligned face crops (any size; resized to the model's and back)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                   "tooltip": "Blend of restored (1) and input (0) crops."}),
            "face_batch": ("INT", {"default": 4, "min": 1, "max": 64,
                                   "tooltip": "Faces per GPEN pass; halved automatically on out-of-memory."}),
        }}

    def restore(self, gpen_model, crops, strength, face_batch):
        progress = host.Progress()
        with gpen_model as model:
            return (restore_aligned(model, crops, strength, batch_size=face_batch, on_batch=progress.step),)


class PasteFacesBack:
    DESCRIPTION = "Blends restored crops back into the frames they were cut from."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    OUTPUT_TOOLTIPS = ("The frames with the faces pasted back.", "The blend mask of each frame.")
    FUNCTION = "paste"

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "image": ("IMAGE", {"tooltip": "The frames the faces were detected in."}),
            "restored": ("IMAGE", {"tooltip": "Restored crops, in the order Detect and Crop Faces gave them."}),
            "face_info": ("FACE_INFO", {"tooltip": "From Detect and Crop Faces."}),
        }
        return {"required": _paste_options(required)}

    def paste(self, image, restored, face_info, strength, mask_shape, feather, erode, color_correction):
        if tuple(image.shape[1:3]) != tuple(face_info.image_size):
            raise ValueError(f"image is {tuple(image.shape[1:3])} but the faces were found in "
                             f"{tuple(face_info.image_size)} frames")
        if len(restored) != len(face_info):
            raise ValueError(f"{len(restored)} restored crops for {len(face_info)} detected faces")
        return gpen.paste_faces(image, restored[..., :3], face_info.affines, face_info.frames, strength=strength,
                                mask_shape=mask_shape, feather=feather, erode=erode,
                                color_correction=color_correction, crop_size=face_info.crop_size,
                                device=face_info.device)


class GPENFaceRestore:
    DESCRIPTION = ("Restores every face in the image or video frames with GPEN: detect, align, restore and "
                   "blend back in one node. Frames without faces pass through unchanged.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    OUTPUT_TOOLTIPS = ("The restored frames.", "Where faces were restored in each frame.")
    FUNCTION = "restore"

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "image": ("IMAGE", {"tooltip": "One image or a batch of video frames."}),
            "gpen_model": ("GPEN_MODEL", {"tooltip": "From Load GPEN Model."}),
            "face_detector": ("FACE_DETECTOR", {"tooltip": "From Load Face Detector."}),
            "face_batch": ("INT", {"default": 4, "min": 1, "max": 64,
                                   "tooltip": "Faces per GPEN pass, across frames; halved automatically on out-of-memory."}),
        }
        return {"required": _paste_options(_detection_options(required))}

    def restore(self, image, gpen_model, face_detector, face_batch, threshold, min_size, max_faces, order, indices,
                temporal_smoothing, strength, mask_shape, feather, erode, color_correction):
        progress = host.Progress()
        with gpen_model as model, face_detector as detector:
            result = gpen.restore_faces(image, model, detector, threshold=threshold, min_size=min_size,
                                        max_faces=max_faces, order=order, indices=indices, strength=strength,
                                        mask_shape=mask_shape, feather=feather, erode=erode,
                                        color_correction=color_correction, temporal_sigma=temporal_smoothing,
                                        face_batch=face_batch, progress=progress, cancel=progress.cancel)
        logging.info("[GPEN] %s", result.summary)
        return (result.images, result.masks)


NODE_CLASS_MAPPINGS = {
    "GPENLoadModel": LoadGPENModel,
    "GPENLoadFaceDetector": LoadFaceDetector,
    "GPENDetectAndCropFaces": DetectAndCropFaces,
    "GPENRestoreFaces": GPENRestoreFaces,
    "GPENPasteFacesBack": PasteFacesBack,
    "GPENFaceRestore": GPENFaceRestore,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "GPENLoadModel": "Load GPEN Model",
    "GPENLoadFaceDetector": "Load Face Detector (GPEN)",
    "GPENDetectAndCropFaces": "Detect and Crop Faces (GPEN)",
    "GPENRestoreFaces": "GPEN Restore Faces",
    "GPENPasteFacesBack": "Paste Faces Back (GPEN)",
    "GPENFaceRestore": "GPEN Face Restore",
}
