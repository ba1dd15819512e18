"""The GPEN nodes (ComfyUI's V1 node API). Each is a thin shell over the gpen library."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

from .. import gpen
from ..gpen.devices import resolve_dtype
from ..gpen.faces.detect import ROTATIONS
from ..gpen.faces.options import (
    PARSE_FEATHER,
    MaskOptions,
    PasteOptions,
    SelectOptions,
    declared,
    spec_of,
    surface_name,
)
from ..gpen.faces.parse import parse_faces
from ..gpen.faces.pipeline import face_areas, face_report, locate_faces, paste_restored
from ..gpen.faces.restore import restore_aligned
from ..gpen.faces.run_memory import run_working_bytes
from ..gpen.faces.tensors import as_rgb
from ..gpen.loader import load_parser
from . import host

CATEGORY = "GPEN"
PRECISION_HELP = ("auto: fp16 on NVIDIA GPUs with tensor cores (from 2017's Volta) and on AMD GPUs (ROCm), fp32 on "
                  "older NVIDIA GPUs and the CPU. ONNX files keep their own.")
_CACHE: OrderedDict = OrderedDict()  # (path, mtime, device, options) -> host.Loaded, the last few kept


def _cached(key, load):
    """One loaded model per file, device and options, shared by every node that loads it."""
    if key not in _CACHE:
        _CACHE[key] = load()
        while len(_CACHE) > 4:  # a GPEN model, a detector and a parser or two
            _CACHE.popitem(last=False)[1].release()  # off the GPU: ComfyUI no longer sees it
    _CACHE.move_to_end(key)
    return _CACHE[key]


# The option widgets, by name, in the order saved workflows store their values.
SELECT_WIDGETS = ("threshold", "min_size", "max_faces", "order", "indices", "temporal_smoothing")
PASTE_WIDGETS = ("strength", "mask_shape", "feather", "erode", "color_correction")
MASK_WIDGETS = ("mask_regions", "parse_source", "parse_feather")
WIDGET_TYPES = {bool: "BOOLEAN", str: "STRING", int: "INT", float: "FLOAT"}


def option_widgets(options: type, names: tuple[str, ...]) -> dict:
    """ComfyUI inputs for these options, as faces/options.py declares them."""
    fields = {surface_name(f): f for f in declared(options)}
    return {name: option_widget(fields[name]) for name in names}


def option_widget(field) -> tuple:
    spec = spec_of(field)
    widget_type = spec.widget or WIDGET_TYPES[type(field.default)]
    default = int(field.default) if widget_type == "INT" else \
        round(field.default, 4) if widget_type == "FLOAT" else field.default
    settings = {"default": default}
    if spec.slider is not None:
        low, high, step = spec.slider
        settings.update({"min": low, "max": high, **({"step": step} if step is not None else {})})
    settings["tooltip"] = spec.help
    choices = spec.choices or spec.presets
    return (list(choices), settings) if choices else (widget_type, settings)


def _select(threshold, min_size, max_faces, order, indices, temporal_smoothing, **more) -> SelectOptions:
    return SelectOptions(threshold=threshold, min_size=min_size, max_faces=max_faces, order=order, indices=indices,
                         temporal_sigma=temporal_smoothing, **more)


def _paste(strength, mask_shape, feather, erode, color_correction, **more) -> PasteOptions:
    return PasteOptions(strength=strength, mask_shape=mask_shape, feather=feather, erode=erode,
                        color_correction=color_correction, **more)


ORIGINAL_IMAGE = ("IMAGE", {"tooltip": "The image before a face swap (connect ReActor's input image): only the faces "
                                       "the swap changed are taken, and frames where nothing changed pass through."})
BACKGROUND = ("IMAGE", {"tooltip": "The same image at a larger size (from an upscaler): the faces are found in "
                                    "image and pasted into this, at up to the restorer's own detail."})
FACE_PARSER = ("FACE_PARSER", {"tooltip": "From Load Face Parser: restore only the face's own pixels (mask_regions), "
                                          "never hair, hands or what covers the face."})


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
                          "tooltip": PRECISION_HELP}),
            "device": (["auto", "cpu", "gpu"], {"default": "auto", "tooltip": "Where the model runs; auto follows ComfyUI."}),
        }}

    def load(self, model_name: str, precision: str, device: str):
        path = host.find_gpen_file(model_name)
        target = host.torch_device(device)
        dtype = resolve_dtype(precision, target)
        key = (path, os.path.getmtime(path), target, dtype)
        return (_cached(key, lambda: host.load_handle(gpen.load_model, path, target, dtype=dtype)),)


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
            "rotations": (list(ROTATIONS), {"default": "none", "tooltip": "none: upright faces (rolled up to "
                          "~20 degrees). all: also faces on their side, upside down or at any angle (a phone held "
                          "sideways, people lying down), about 14x the detection time. auto: only on frames where the "
                          "upright pass finds no face, or a tilted or doubtful one."}),
        }}

    def load(self, detector_name: str, device: str, detect_size: str = "auto", rotations: str = "none"):
        path = host.find_detector_file(detector_name)
        target = host.torch_device(device)
        detect_size = detect_size.strip() or "auto"
        key = (path, os.path.getmtime(path), target, detect_size, rotations)
        return (_cached(key, lambda: host.load_handle(gpen.load_detector, path, target, detect_size=detect_size,
                                                      rotations=rotations)),)


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
                          "tooltip": PRECISION_HELP}),
            "device": (["auto", "cpu", "gpu"], {"default": "auto", "tooltip": "Where the parser runs; auto follows ComfyUI."}),
        }, "optional": {
            "and_parser": ("FACE_PARSER", {"tooltip": "Another Load Face Parser (e.g. an occluder): both are used, "
                                                      "their masks combined by minimum."}),
        }}

    def load(self, parser_name: str, precision: str, device: str, and_parser=None):
        path = host.find_parser_file(parser_name)
        target = host.torch_device(device)
        dtype = resolve_dtype(precision, target)
        key = (path, os.path.getmtime(path), target, dtype)
        parser = _cached(key, lambda: host.load_handle(load_parser, path, target, dtype=dtype))
        return ((*(and_parser or ()), parser),)


SUMMARY_TOOLTIP = ("What was done: each face (index, detector score, size) and each one skipped, with why. "
                   "Connect a Preview Any node to see it.")


CROP_SIZE = ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64,
                     "tooltip": "Size of the crops (ignored when a GPEN model is connected: its size is used)."})
CROP_SIZE_FROM = ("GPEN_MODEL", {"tooltip": "Take the crop size from this model."})


def crop_size_of(gpen_model, crop_size: int) -> int:
    """The crops' size: a connected GPEN model's (CROP_SIZE_FROM), else the crop_size widget's."""
    return gpen_model.model.size if gpen_model is not None else crop_size


def cropped(image, crops, info, notes: list[str] = ()) -> tuple:
    """What the nodes that cut faces out give: crops (on the CPU), face info, the frames' face areas, summary."""
    summary = face_report(info, "; ".join([f"{len(crops)} face(s) cropped", *notes, *info.selection.notes()]),
                          "cropped")
    logging.info("[GPEN] %s", summary)
    return crops.cpu(), info, face_areas(image, crops, info), summary


class DetectAndCropFaces:
    DESCRIPTION = "Finds faces in each frame and cuts them out aligned to GPEN's template, for any face restorer."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "FACE_INFO", "MASK", "STRING")
    RETURN_NAMES = ("crops", "face_info", "face_mask", "summary")
    OUTPUT_TOOLTIPS = ("Aligned face crops, one per face across all frames.",
                       "Where each crop came from, for Paste Faces Back.",
                       "The area of each frame the faces cover.",
                       SUMMARY_TOOLTIP)
    FUNCTION = "detect"

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "image": ("IMAGE", {"tooltip": "One image or a batch of video frames."}),
            "face_detector": ("FACE_DETECTOR", {"tooltip": "From Load Face Detector."}),
            "crop_size": CROP_SIZE,
            **option_widgets(SelectOptions, ("template", *SELECT_WIDGETS)),
        }
        return {"required": required, "optional": {"gpen_model": CROP_SIZE_FROM, "original_image": ORIGINAL_IMAGE}}

    def detect(self, image, face_detector, crop_size, template, threshold, min_size, max_faces, order, indices,
               temporal_smoothing, gpen_model=None, original_image=None):
        select = _select(threshold, min_size, max_faces, order, indices, temporal_smoothing, template=template,
                         changed_from=original_image)
        size = crop_size_of(gpen_model, crop_size)
        need = run_working_bytes(image.shape, detector=host.counted(face_detector), crop_size=size)
        (detector,) = host.on_device(face_detector, working_bytes=need)
        crops, info = locate_faces(image, detector, size, select, cancel=host.Progress.cancel)
        return cropped(image, crops, info)


class GPENRestoreFaces:
    DESCRIPTION = "Restores aligned face crops with GPEN (crops from Detect and Crop Faces or from other packs)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("restored", "summary")
    OUTPUT_TOOLTIPS = ("The restored crops, same size as the input crops.",
                       "How many crops GPEN ran on, faces re-run in fp32 and faces left as they were, with why.")
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
        need = run_working_bytes(restorer=host.counted(gpen_model), face_batch=face_batch,
                                 crop_size=crops.shape[1])
        (model,) = host.on_device(gpen_model, working_bytes=need)
        notes = []
        restored = restore_aligned(model, crops, strength, batch_size=face_batch, on_batch=progress.step,
                                   cancel=progress.cancel, notes=notes)
        summary = "; ".join([f"GPEN ran on {len(crops)} crop(s)", *notes])
        logging.info("[GPEN] %s", summary)
        return restored, summary


class PasteFacesBack:
    DESCRIPTION = ("Blends restored crops back into the frames they were cut from; with a face parser, only "
                   "over the face itself.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("image", "mask", "summary")
    OUTPUT_TOOLTIPS = ("The frames with the faces pasted back.", "The blend mask of each frame.", SUMMARY_TOOLTIP)
    FUNCTION = "paste"

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "image": ("IMAGE", {"tooltip": "The frames the faces were detected in, or them at a larger size "
                                           "(from an upscaler): the faces are pasted there."}),
            "restored": ("IMAGE", {"tooltip": "Restored crops, in the order Detect and Crop Faces gave them."}),
            "face_info": ("FACE_INFO", {"tooltip": "From Detect and Crop Faces."}),
        }
        return {"required": {**required, **option_widgets(PasteOptions, PASTE_WIDGETS)},
                "optional": {"face_parser": FACE_PARSER, **option_widgets(MaskOptions, MASK_WIDGETS)}}

    def paste(self, image, restored, face_info, strength, mask_shape, feather, erode, color_correction,
              face_parser=None, mask_regions="face", parse_source="original", parse_feather=PARSE_FEATHER):
        paste = _paste(strength, mask_shape, feather, erode, color_correction)
        progress = host.Progress()
        need = run_working_bytes(image.shape, parsers=host.handles(face_parser), crop_size=restored.shape[1])
        parsers = host.on_device(*(face_parser or ()), working_bytes=need)
        masks = MaskOptions(parser=parsers or None, regions=mask_regions, source=parse_source, feather=parse_feather)
        result = paste_restored(image, restored, face_info, paste, masks, progress=progress, cancel=progress.cancel)
        logging.info("[GPEN] %s", result.report)
        return (result.images, result.masks, result.report)


class GPENFaceRestore:
    DESCRIPTION = ("Restores every face in the image or video frames with GPEN: detect, align, restore and "
                   "blend back in one node. Frames without faces pass through unchanged. With a face parser, "
                   "only the face itself is restored: hair, hands and what covers the face keep the original.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("image", "mask", "summary")
    OUTPUT_TOOLTIPS = ("The restored frames.", "Where faces were restored in each frame.", SUMMARY_TOOLTIP)
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
        options = {**option_widgets(SelectOptions, SELECT_WIDGETS), **option_widgets(PasteOptions, PASTE_WIDGETS)}
        return {"required": {**required, **options},
                "optional": {"original_image": ORIGINAL_IMAGE, "face_parser": FACE_PARSER,
                             **option_widgets(MaskOptions, MASK_WIDGETS), "background": BACKGROUND,
                             **option_widgets(PasteOptions, ("upscale_by",))}}

    def restore(self, image, gpen_model, face_detector, face_batch, threshold, min_size, max_faces, order, indices,
                temporal_smoothing, strength, mask_shape, feather, erode, color_correction, original_image=None,
                face_parser=None, mask_regions="face", parse_source="original", parse_feather=PARSE_FEATHER,
                background=None, upscale_by=1.0):
        select = _select(threshold, min_size, max_faces, order, indices, temporal_smoothing,
                         changed_from=original_image)
        paste = _paste(strength, mask_shape, feather, erode, color_correction, background=background,
                       upscale_by=upscale_by)
        progress = host.Progress()
        need = run_working_bytes(image.shape, host.counted(gpen_model), host.counted(face_detector),
                                 host.handles(face_parser), face_batch)
        model, detector, *parsers = host.on_device(gpen_model, face_detector, *(face_parser or ()), working_bytes=need)
        masks = MaskOptions(parser=parsers or None, regions=mask_regions, source=parse_source, feather=parse_feather,
                            temporal_sigma=temporal_smoothing)
        result = gpen.restore_faces(image, model, detector, select=select, paste=paste, masks=masks,
                                    face_batch=face_batch, progress=progress, cancel=progress.cancel)
        logging.info("[GPEN] %s", result.report)
        return (result.images, result.masks, result.report)


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
        return {"required": {
            "crops": ("IMAGE", {"tooltip": "Aligned face crops (from Detect and Crop Faces or another pack), any size."}),
            "face_parser": ("FACE_PARSER", {"tooltip": "From Load Face Parser."}),
            **option_widgets(MaskOptions, ("mask_regions", "parse_feather")),
        }}

    def parse(self, crops, face_parser, mask_regions, parse_feather):
        masks = MaskOptions(regions=mask_regions, feather=parse_feather)
        need = run_working_bytes(parsers=host.handles(face_parser), crop_size=crops.shape[1])
        parsers = host.on_device(*face_parser, working_bytes=need)
        return (parse_faces(parsers, as_rgb(crops), masks.regions, masks.feather,
                            on_batch=host.Progress().step, cancel=host.Progress.cancel).cpu(),)


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
