"""The GPEN nodes (ComfyUI's V1 node API). Each is a thin shell over the gpen library."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

from .. import gpen
from ..gpen.devices import resolve_dtype
from ..gpen.faces.align import TEMPLATES, warp_faces
from ..gpen.faces.masks import PARSE_FEATHER, REGION_PRESETS
from ..gpen.faces.parse import parse_faces
from ..gpen.faces.paste import GPEN_ERODE, GPEN_FEATHER, MASK_SHAPES
from ..gpen.faces.pipeline import ORDERS, PARSE_SOURCES, locate_faces
from ..gpen.faces.restore import restore_aligned
from ..gpen.faces.tensors import as_rgb
from ..gpen.loader import load_parser
from . import host

CATEGORY = "GPEN"
_CACHE: OrderedDict = OrderedDict()  # (path, mtime, dtype) -> loaded object, the last few kept


def _cached(key, load):
    if key not in _CACHE:
        _CACHE[key] = load()
        while len(_CACHE) > 4:  # a GPEN model, a detector and a parser or two
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
                                         "tooltip": "For video frames: steadies landmarks (and, with a face "
                                                    "parser, its masks) across frames (Gaussian width in "
                                                    "frames; 0 is off)."}),
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


def _mask_options(inputs: dict, source: bool = True) -> dict:
    """The parse-mask widgets: which regions are restored, what is parsed, how soft the edge is."""
    inputs["mask_regions"] = (list(REGION_PRESETS), {
        "default": "face", "tooltip": "Which parts of the face take the restored pixels (with a face parser). "
                                      "face: skin, brows, eyes, glasses, ears, nose, mouth and lips; hair, hat, "
                                      "neck, earrings, clothes and background keep the original. 'without "
                                      "glasses' keeps the rims, 'without ears' the ears, 'and hair' adds hair."})
    if source:
        inputs["parse_source"] = (list(PARSE_SOURCES), {
            "default": "original", "tooltip": "What the face parser looks at: original, the face before "
                                              "restoration (sees a hand or a microphone in front of it); "
                                              "restored, GPEN's face (as facexlib does)."})
    inputs["parse_feather"] = ("FLOAT", {"default": round(PARSE_FEATHER, 4), "min": 0.0, "max": 0.1, "step": 0.001,
                                         "tooltip": "Softness of the parse mask's edge, as a fraction of the "
                                                    "face crop; the soft edge stays inside the mask."})
    return inputs


ORIGINAL_IMAGE = ("IMAGE", {"tooltip": "The image before a face swap (connect ReActor's input image): only the faces "
                                       "the swap changed are taken, and frames where nothing changed pass through."})


def _parser_options(optional: dict) -> dict:
    optional["face_parser"] = ("FACE_PARSER", {"tooltip": "From Load Face Parser: restore only the face's own "
                                                          "pixels (mask_regions), never hair, hands or what "
                                                          "covers the face."})
    return _mask_options(optional)


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
        model = _cached(key, lambda: host.load_handle(gpen.load_model, path, target, dtype=dtype))
        return (host.Loaded(model, target),)


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
        detector = _cached(key, lambda: host.load_handle(gpen.load_detector, path, target, detect_size=detect_size))
        return (host.Loaded(detector, target),)


class LoadFaceParser:
    DESCRIPTION = ("Loads a face parser: facexlib's BiSeNet or ParseNet (parsing_bisenet.pth, parsing_parsenet.pth) "
                   "or FaceFusion's ONNX region parsers (bisenet_resnet_*.onnx) and occluders (xseg_*.onnx). "
                   "Chain two (a region parser and an occluder) through and_parser: a pixel is restored only "
                   "where every one of them shows the face.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FACE_PARSER",)
    OUTPUT_TOOLTIPS = ("The face parser, with any chained to it: for GPEN Face Restore, Paste Faces Back, Face Parsing Mask.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "parser_name": (host.parser_files(), {"tooltip": "A parser or occluder from models/facedetection or "
                                                             "models/face_parsing (.pth, .safetensors or .onnx)."}),
            "precision": (["auto", "fp32", "fp16", "bf16"], {"default": "auto",
                          "tooltip": "auto: fp16 on a GPU, fp32 on the CPU. ONNX files keep their own."}),
            "device": (["auto", "cpu", "gpu"], {"default": "auto", "tooltip": "Where the parser runs; auto follows ComfyUI."}),
        }, "optional": {
            "and_parser": ("FACE_PARSER", {"tooltip": "Another Load Face Parser (e.g. an occluder): both are used, "
                                                      "their masks combined by minimum."}),
        }}

    def load(self, parser_name: str, precision: str, device: str, and_parser=None):
        path = host.find_parser_file(parser_name)
        target = host.torch_device(device)
        dtype = resolve_dtype(precision, target)
        key = (path, os.path.getmtime(path), dtype, target.type)
        parser = _cached(key, lambda: host.load_handle(load_parser, path, target, dtype=dtype))
        return ((*(and_parser or ()), host.Loaded(parser, target)),)


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
                "optional": {"gpen_model": ("GPEN_MODEL", {"tooltip": "Take the crop size from this model."}),
                             "original_image": ORIGINAL_IMAGE}}

    def detect(self, image, face_detector, crop_size, template, threshold, min_size, max_faces, order, indices,
               temporal_smoothing, gpen_model=None, original_image=None):
        size = gpen_model.model.size if gpen_model is not None else crop_size
        with face_detector as detector:
            crops, info = locate_faces(image, detector, size, template=template, cancel=host.Progress.cancel,
                                       changed_from=original_image, threshold=threshold, min_size=min_size, max_faces=max_faces, order=order,
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
            return (restore_aligned(model, crops, strength, batch_size=face_batch, on_batch=progress.step,
                                    cancel=progress.cancel),)


class PasteFacesBack:
    DESCRIPTION = ("Blends restored crops back into the frames they were cut from; with a face parser, only "
                   "over the face itself.")
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
        return {"required": _paste_options(required), "optional": _parser_options({})}

    def paste(self, image, restored, face_info, strength, mask_shape, feather, erode, color_correction,
              face_parser=None, mask_regions="face", parse_source="original", parse_feather=PARSE_FEATHER):
        if tuple(image.shape[1:3]) != tuple(face_info.image_size):
            raise ValueError(f"image is {tuple(image.shape[1:3])} but the faces were found in "
                             f"{tuple(face_info.image_size)} frames")
        if len(restored) != len(face_info):
            raise ValueError(f"{len(restored)} restored crops for {len(face_info)} detected faces")
        restored = as_rgb(restored)
        face_masks = None
        if face_parser is not None and len(restored):
            if parse_source == "original":  # the crops Detect and Crop Faces cut, cut again from the frames
                crops = warp_faces(image, face_info.affines, face_info.frames, face_info.crop_size,
                                   face_info.device).clamp_(0, 1).permute(0, 2, 3, 1)
            else:
                crops = restored.to(face_info.device)
            with host.using_all(face_parser) as parsers:
                face_masks = parse_faces(parsers, crops, mask_regions, parse_feather, on_batch=host.Progress().step)
        return gpen.paste_faces(image, restored, face_info.affines, face_info.frames, strength=strength,
                                mask_shape=mask_shape, feather=feather, erode=erode,
                                color_correction=color_correction, crop_size=face_info.crop_size,
                                face_masks=face_masks, device=face_info.device)


class GPENFaceRestore:
    DESCRIPTION = ("Restores every face in the image or video frames with GPEN: detect, align, restore and "
                   "blend back in one node. Frames without faces pass through unchanged. With a face parser, "
                   "only the face itself is restored: hair, hands and what covers the face keep the original.")
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
        return {"required": _paste_options(_detection_options(required)),
                "optional": _parser_options({"original_image": ORIGINAL_IMAGE})}

    def restore(self, image, gpen_model, face_detector, face_batch, threshold, min_size, max_faces, order, indices,
                temporal_smoothing, strength, mask_shape, feather, erode, color_correction, original_image=None,
                face_parser=None, mask_regions="face", parse_source="original", parse_feather=PARSE_FEATHER):
        progress = host.Progress()
        with gpen_model as model, face_detector as detector, host.using_all(face_parser) as parsers:
            result = gpen.restore_faces(image, model, detector, threshold=threshold, min_size=min_size,
                                        max_faces=max_faces, order=order, indices=indices, strength=strength,
                                        mask_shape=mask_shape, feather=feather, erode=erode,
                                        color_correction=color_correction, temporal_sigma=temporal_smoothing,
                                        face_batch=face_batch, changed_from=original_image,
                                        parser=parsers, mask_regions=mask_regions,
                                        parse_source=parse_source, parse_feather=parse_feather,
                                        mask_temporal_sigma=temporal_smoothing, progress=progress,
                                        cancel=progress.cancel)
        logging.info("[GPEN] %s", result.summary)
        return (result.images, result.masks)


class FaceParsingMask:
    DESCRIPTION = ("A mask of each aligned face crop from a face parser: 1 where the face shows (mask_regions, "
                   "and nothing covers it), for any pack's paste-back or inpainting.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("mask",)
    OUTPUT_TOOLTIPS = ("One mask per crop, the crops' size, 0..1.",)
    FUNCTION = "parse"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": _mask_options({
            "crops": ("IMAGE", {"tooltip": "Aligned face crops (from Detect and Crop Faces or another pack), any size."}),
            "face_parser": ("FACE_PARSER", {"tooltip": "From Load Face Parser."}),
        }, source=False)}

    def parse(self, crops, face_parser, mask_regions, parse_feather):
        with host.using_all(face_parser) as parsers:
            return (parse_faces(parsers, as_rgb(crops), mask_regions, parse_feather,
                                on_batch=host.Progress().step).cpu(),)


NODE_CLASS_MAPPINGS = {
    "GPENLoadModel": LoadGPENModel,
    "GPENLoadFaceDetector": LoadFaceDetector,
    "GPENLoadFaceParser": LoadFaceParser,
    "GPENDetectAndCropFaces": DetectAndCropFaces,
    "GPENRestoreFaces": GPENRestoreFaces,
    "GPENPasteFacesBack": PasteFacesBack,
    "GPENFaceRestore": GPENFaceRestore,
    "GPENFaceParsingMask": FaceParsingMask,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "GPENLoadModel": "Load GPEN Model",
    "GPENLoadFaceDetector": "Load Face Detector (GPEN)",
    "GPENLoadFaceParser": "Load Face Parser (GPEN)",
    "GPENDetectAndCropFaces": "Detect and Crop Faces (GPEN)",
    "GPENRestoreFaces": "GPEN Restore Faces",
    "GPENPasteFacesBack": "Paste Faces Back (GPEN)",
    "GPENFaceRestore": "GPEN Face Restore",
    "GPENFaceParsingMask": "Face Parsing Mask (GPEN)",
}
