"""The nodes that join the Impact Pack's SEGS world (FaceDetailer, Detailer (SEGS), SEGSPaste, the SEGS filters)
without importing it: SEGS and BBOX_DETECTOR are plain values both packs agree on (gpen/faces/segs.py)."""

from __future__ import annotations

import logging

import torch

from ..gpen.faces.options import MaskOptions, PasteOptions, SegmentOptions, SelectOptions
from ..gpen.faces.run_memory import run_working_bytes
from ..gpen.faces.segs import FaceSegmentDetector, info_to_segs, locate_faces_in_segs, restore_segs
from . import host
from .gpen_nodes import (
    CATEGORY,
    CROP_SIZE,
    CROP_SIZE_FROM,
    FACE_PARSER,
    PARSE_FEATHER,
    SUMMARY_TOOLTIP,
    crop_size_of,
    cropped,
    option_widgets,
)

SEGMENT_WIDGETS = ("crop_factor", "dilation", "drop_size", "segment_mask")
SEGS_TOOLTIP = "The Impact Pack's segments of one image (from BBOX Detector (SEGS), a SEGS filter or our nodes)."
FACE_DETECTOR = ("FACE_DETECTOR", {"tooltip": "From Load Face Detector (GPEN)."})


class FaceDetectorForFaceDetailer:
    DESCRIPTION = ("Our face detector (RetinaFace or SCRFD, with its detect_size and rotations) as the Impact Pack's "
                   "BBOX_DETECTOR: for FaceDetailer, BBOX Detector (SEGS) and every SEGS node. Its segments carry "
                   "the faces' landmarks, so GPEN Restore SEGS aligns them exactly.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("BBOX_DETECTOR",)
    RETURN_NAMES = ("bbox_detector",)
    OUTPUT_TOOLTIPS = ("For FaceDetailer's bbox_detector or BBOX Detector (SEGS). crop_factor, dilation and "
                       "drop_size are the detailer's, as with Impact's own detectors.",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        threshold = option_widgets(SelectOptions, ("threshold",))["threshold"]
        threshold = (threshold[0], {**threshold[1], "tooltip": threshold[1]["tooltip"] + " A face must pass both "
                                    "this and the detailer's bbox_threshold."})
        return {"required": {"face_detector": FACE_DETECTOR, "threshold": threshold,
                             **option_widgets(SegmentOptions, ("segment_mask",))},
                "optional": {"face_parser": FACE_PARSER, **option_widgets(MaskOptions, ("mask_regions",))}}

    def make(self, face_detector, threshold, segment_mask, face_parser=None, mask_regions="face"):
        return (LoadedFaceSegmentDetector(face_detector, threshold, segment_mask, parsers=face_parser,
                                          regions=mask_regions),)


class LoadedFaceSegmentDetector(FaceSegmentDetector):
    """FaceSegmentDetector over the nodes' loaded detector and parsers (host.Loaded): the Impact Pack's nodes
    call its detect later, as often as they need, and each call puts them on their device in one request,
    with the memory the detection needs."""

    def models(self, images: torch.Tensor) -> tuple:
        need = run_working_bytes(images.shape, detector=host.counted(self.detector), parsers=host.handles(self.parsers),
                                 crop_size=self.parse_size)
        detector, *parsers = host.on_device(self.detector, *(self.parsers or ()), working_bytes=need)
        return detector, parsers or None


class RestoreSEGS:
    DESCRIPTION = ("Restores the face in each segment of a SEGS (from any detector: YOLO, ours, after Impact's "
                   "filters) with GPEN and pastes it under the segment's mask. Also gives the SEGS with each "
                   "segment's cropped_image restored, for SEGSPaste and Impact's other SEGS nodes. A segment "
                   "without a face is passed through and counted.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "SEGS", "MASK", "STRING")
    RETURN_NAMES = ("image", "segs", "mask", "summary")
    OUTPUT_TOOLTIPS = ("The image with the segments' faces restored.",
                       "The same segments, each restored one's cropped_image its restored crop region.",
                       "Where restored pixels went, each frame.", SUMMARY_TOOLTIP)
    FUNCTION = "restore"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image the segments were found in (or it scaled: the segments are "
                                           "scaled with it); a batch of frames shares the segments."}),
            "segs": ("SEGS", {"tooltip": SEGS_TOOLTIP}),
            "gpen_model": ("GPEN_MODEL", {"tooltip": "From Load GPEN Model."}),
            **option_widgets(PasteOptions, ("strength",)),
            "face_batch": ("INT", {"default": 4, "min": 1, "max": 64,
                                   "tooltip": "Faces per GPEN pass; halved automatically on out-of-memory."}),
            **option_widgets(PasteOptions, ("color_correction",)),
            **option_widgets(SegmentOptions, ("feather",)),
        }, "optional": {
            "face_detector": ("FACE_DETECTOR", {"tooltip": "Finds each segment's face and its landmarks near the "
                                                           "segment's box. Needed unless the segments come from "
                                                           "our detector, which leaves the landmarks in them."}),
            "face_parser": FACE_PARSER,
            **option_widgets(MaskOptions, ("mask_regions", "parse_source", "parse_feather")),
        }}

    INPUT_IS_LIST = True  # to pair a batch's frames with one SEGS each (Faces to SEGS gives them so)
    OUTPUT_IS_LIST = (True, True, True, True)

    def restore(self, image, segs, gpen_model, strength, face_batch, color_correction, feather,
                face_detector=(None,), face_parser=(None,), mask_regions=("face",), parse_source=("original",),
                parse_feather=(PARSE_FEATHER,)):
        paste = PasteOptions(strength=strength[0], color_correction=color_correction[0])
        progress = host.Progress()
        outputs = ([], [], [], [])
        need = run_working_bytes(largest(image), host.counted(gpen_model[0]), host.counted(face_detector[0]),
                                 host.handles(face_parser[0]), face_batch[0])
        model, detector, *parsers = host.on_device(gpen_model[0], face_detector[0], *(face_parser[0] or ()),
                                                   working_bytes=need)
        masks = MaskOptions(parser=parsers or None, regions=mask_regions[0], source=parse_source[0],
                            feather=parse_feather[0])
        for frames, frame_segs in paired(image, segs):
            result = restore_segs(frames, frame_segs, model, detector, paste=paste, masks=masks, feather=feather[0],
                                  face_batch=face_batch[0], progress=progress, cancel=progress.cancel)
            logging.info("[GPEN] %s", result.summary)
            outputs[0].append(result.images)
            outputs[1].extend(result.segs if isinstance(result.segs, list) else [result.segs])
            outputs[2].append(result.masks)
            outputs[3].append(result.summary)
        return outputs


class FacesToSEGS:
    DESCRIPTION = ("The faces Detect and Crop Faces found, as the Impact Pack's SEGS: one per frame, each face a "
                   "segment with its crop region, mask, score and landmarks, for SEGSPaste, Detailer (SEGS) and "
                   "Impact's SEGS filters.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("SEGS",)
    RETURN_NAMES = ("segs",)
    OUTPUT_IS_LIST = (True,)
    OUTPUT_TOOLTIPS = ("One SEGS per frame (a list: nodes after it run once per frame; one image gives one).",)
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"face_info": ("FACE_INFO", {"tooltip": "From Detect and Crop Faces (GPEN)."}),
                             **option_widgets(SegmentOptions, SEGMENT_WIDGETS)},
                "optional": {"image": ("IMAGE", {"tooltip": "The image the faces were found in: fills each "
                                                            "segment's cropped_image, and lets a face parser look."}),
                             "face_parser": FACE_PARSER, **option_widgets(MaskOptions, ("mask_regions",))}}

    def convert(self, face_info, crop_factor, dilation, drop_size, segment_mask, image=None, face_parser=None,
                mask_regions="face"):
        options = SegmentOptions(crop_factor=crop_factor, dilation=dilation, drop_size=drop_size,
                                 segment_mask=segment_mask)
        need = run_working_bytes(None if image is None else image.shape, parsers=host.handles(face_parser),
                                 crop_size=face_info.crop_size)
        parsers = host.on_device(*(face_parser or ()), working_bytes=need)
        return (info_to_segs(face_info, options, image, parsers or None, MaskOptions(regions=mask_regions)),)


class DetectFacesInSEGS:
    DESCRIPTION = ("Detect and Crop Faces, restricted to the faces inside a SEGS's segments: Impact's SEGS filters "
                   "(by label, order, size, range) choose which faces our modular nodes restore.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "FACE_INFO", "MASK", "STRING")
    RETURN_NAMES = ("crops", "face_info", "face_mask", "summary")
    OUTPUT_TOOLTIPS = ("Aligned face crops, in the segments' order.", "Where each crop came from, for Paste Faces "
                       "Back.", "The area of each frame the faces cover.", SUMMARY_TOOLTIP)
    FUNCTION = "detect"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image the segments were found in; a batch of frames shares them."}),
            "segs": ("SEGS", {"tooltip": SEGS_TOOLTIP + " A face is taken when its box centre lies on a segment."}),
            "face_detector": FACE_DETECTOR,
            "crop_size": CROP_SIZE,
            **option_widgets(SelectOptions, ("template", "threshold")),
        }, "optional": {"gpen_model": CROP_SIZE_FROM}}

    INPUT_IS_LIST = True  # as GPEN Restore SEGS
    OUTPUT_IS_LIST = (True, True, True, True)

    def detect(self, image, segs, face_detector, crop_size, template, threshold, gpen_model=(None,)):
        select = SelectOptions(threshold=threshold[0], template=template[0])
        size = crop_size_of(gpen_model[0], crop_size[0])
        outputs = ([], [], [], [])
        need = run_working_bytes(largest(image), detector=host.counted(face_detector[0]), crop_size=size)
        (detector,) = host.on_device(face_detector[0], working_bytes=need)
        for frames, frame_segs in paired(image, segs):
            crops, info, notes = locate_faces_in_segs(frames, frame_segs, detector, size, select,
                                                      cancel=host.Progress.cancel)
            for output, value in zip(outputs, cropped(frames, crops, info, notes)):
                output.append(value)
        return outputs


def largest(images: list) -> tuple[int, ...]:
    """The shape of the largest of a list's images (or batches): what a run's memory is sized by."""
    return max((image.shape for image in images), key=lambda shape: shape.numel())


def paired(images: list, segs: list) -> list[tuple]:
    """What a node taking lists (INPUT_IS_LIST) runs on: one image or batch with its SEGS, one per frame where
    a list of them comes (Faces to SEGS on a batch); an image list element by element, as ComfyUI would, with
    one SEGS for all of them or one each."""
    if len(images) == 1:
        return [(images[0], segs[0] if len(segs) == 1 else list(segs))]
    if len(segs) not in (1, len(images)):
        raise ValueError(f"{len(segs)} SEGS for a list of {len(images)} images: give one SEGS, or one per image")
    return [(frames, segs[i if len(segs) > 1 else 0]) for i, frames in enumerate(images)]


NODE_CLASS_MAPPINGS = {
    "GPENFaceDetectorForFaceDetailer": FaceDetectorForFaceDetailer,
    "GPENRestoreSEGS": RestoreSEGS,
    "GPENFacesToSEGS": FacesToSEGS,
    "GPENSEGSToFaces": DetectFacesInSEGS,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "GPENFaceDetectorForFaceDetailer": "GPEN Face Detector for FaceDetailer",
    "GPENRestoreSEGS": "GPEN Restore SEGS",
    "GPENFacesToSEGS": "Faces to SEGS (GPEN)",
    "GPENSEGSToFaces": "Detect Faces in SEGS (GPEN)",
}
