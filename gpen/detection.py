"""Face detection on ComfyUI image batches: RetinaFace in torch, or insightface's SCRFD.

`load_detector(path)` recognises the file; `detector.detect(images)` takes (B,H,W,3) float 0..1 and
returns one `Faces` per image, in image pixels, best score first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, check_file, describe_other_network, first_line, read_state_dict
from .images import as_rgb
from .retinaface import RetinaFace, decode, prior_boxes

BGR_MEAN = (104.0, 117.0, 123.0)


@dataclass
class Faces:
    """Faces found in one image: boxes (N,4) xyxy px, scores (N), landmarks (N,5,2) px.

    Landmark order: left eye, right eye, nose, left mouth corner, right mouth corner, as seen in the image.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    landmarks: torch.Tensor

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, index) -> "Faces":
        return Faces(self.boxes[index], self.scores[index], self.landmarks[index])

    @classmethod
    def empty(cls) -> "Faces":
        return cls(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 5, 2))


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) intersection over union of xyxy boxes."""
    area = lambda x: (x[:, 2] - x[:, 0]).clamp(min=0) * (x[:, 3] - x[:, 1]).clamp(min=0)
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    return inter / (area(a)[:, None] + area(b)[None, :] - inter).clamp(min=1e-9)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices kept by greedy NMS, best first, computed without a Python loop over boxes.

    Cluster-NMS: iterating 'keep the boxes not overlapped by a kept, better box' reaches the exact
    greedy result in a few matrix steps, which suits GPUs.
    """
    order = scores.argsort(descending=True)
    boxes = boxes[order]
    overlaps = torch.triu(box_iou(boxes, boxes) > iou_threshold, diagonal=1).float()  # [i, j]: better i overlaps j
    keep = torch.ones(len(boxes), device=boxes.device)
    for _ in range(len(boxes)):
        new_keep = (keep @ overlaps == 0).float()
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return order[keep.bool()]


class RetinaFaceDetector:
    kind = "retinaface"

    def __init__(self, net: RetinaFace, device: torch.device, max_side: int = 1600, frames_per_batch: int = 4):
        self.net = net.to(device).eval().requires_grad_(False)
        self.device = device
        self.max_side = max_side
        self.frames_per_batch = frames_per_batch

    @property
    def name(self) -> str:
        return f"RetinaFace {self.net.backbone}"

    def to(self, device: torch.device | str) -> "RetinaFaceDetector":
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    def detect(self, images: torch.Tensor, threshold: float = 0.5, nms_threshold: float = 0.4,
               top_k: int = 5000) -> list[Faces]:
        images = as_rgb(images)
        height, width = images.shape[1:3]
        scale = min(1.0, self.max_side / max(height, width, 1))
        results = []
        with torch.inference_mode():
            for start in range(0, len(images), self.frames_per_batch):
                x = images[start:start + self.frames_per_batch].to(self.device, torch.float32).permute(0, 3, 1, 2)
                if scale < 1:  # large frames are detected downscaled and the results mapped back
                    x = F.interpolate(x, scale_factor=scale, mode="bilinear", antialias=True, recompute_scale_factor=True)
                mean = torch.tensor(BGR_MEAN, device=self.device).view(1, 3, 1, 1)
                x = x.flip(1) * 255 - mean
                offsets, scores, landmark_offsets = self.net(x)
                priors = prior_boxes(*x.shape[-2:], device=self.device)
                boxes, points = decode(offsets, landmark_offsets, priors)
                sx, sy = width / x.shape[-1], height / x.shape[-2]
                boxes = boxes * boxes.new_tensor([sx, sy, sx, sy])
                points = points * points.new_tensor([sx, sy])
                for b, s, p in zip(boxes, scores, points):
                    results.append(_select(b, s, p, threshold, nms_threshold, top_k))
        return results


class ScrfdDetector:
    """insightface's SCRFD (det_10g.onnx of buffalo_l, scrfd_*_bnkps.onnx), run through insightface."""

    kind = "scrfd"

    def __init__(self, path: Path, device: torch.device, input_size: int = 640):
        try:
            from insightface.model_zoo.scrfd import SCRFD
        except ImportError:
            raise ImportError(f"{path}: SCRFD detectors need insightface: pip install insightface") from None
        try:
            self.model = SCRFD(model_file=str(path))
            self.model.prepare(0 if device.type == "cuda" else -1, input_size=(input_size, input_size))
        except Exception as e:  # insightface and onnxruntime raise assorted types for bad files
            raise CheckpointError(path, f"is not a usable SCRFD model ({first_line(e)})") from None
        if not getattr(self.model, "use_kps", False):
            raise CheckpointError(path, "is an SCRFD model without landmarks (use a *_bnkps or det_10g file)")
        self.device = device
        self.name = f"SCRFD {path.name}"

    def detect(self, images: torch.Tensor, threshold: float = 0.5, nms_threshold: float = 0.4,
               top_k: int = 5000) -> list[Faces]:
        self.model.det_thresh, self.model.nms_thresh = threshold, nms_threshold
        results = []
        for image in as_rgb(images):
            bgr = (image.clamp(0, 1) * 255).round().to(torch.uint8).flip(-1).cpu().numpy()
            boxes, points = self.model.detect(np.ascontiguousarray(bgr), max_num=top_k if top_k < 5000 else 0)
            faces = Faces(torch.from_numpy(boxes[:, :4]).float(), torch.from_numpy(boxes[:, 4]).float(),
                          torch.from_numpy(points).float().reshape(-1, 5, 2))
            results.append(faces[faces.scores.argsort(descending=True)])
        return results


def load_detector(path: str | os.PathLike, device: torch.device | str | None = None,
                  max_side: int = 1600):
    """A face detector from a RetinaFace .pth (either backbone) or an insightface SCRFD .onnx."""
    from .loader import resolve_device

    path, device = Path(path), resolve_device(device)
    if path.suffix.lower() == ".onnx":
        check_file(path)
        return ScrfdDetector(path, device)
    state = read_state_dict(path)
    backbone = RetinaFace.backbone_of(state)
    if backbone is None:
        other = describe_other_network(state)
        found = f"holds {other} weights" if other and "RetinaFace" not in other else "is not a RetinaFace checkpoint"
        if "generator.style.1.weight" in state:
            found = "holds GPEN restoration weights"
        raise CheckpointError(path, f"{found}; face detectors are detection_Resnet50_Final.pth, "
                              "detection_mobilenet0.25_Final.pth or an SCRFD .onnx")
    net = RetinaFace(backbone)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(path, f"has RetinaFace keys but does not fit the {backbone} layout "
                              f"({first_line(e)})") from None
    return RetinaFaceDetector(net, device, max_side=max_side)



def _select(boxes, scores, points, threshold, nms_threshold, top_k) -> Faces:
    keep = (scores > threshold).nonzero().squeeze(1)
    keep = keep[scores[keep].argsort(descending=True)[:top_k]]
    keep = keep[nms(boxes[keep], scores[keep], nms_threshold)]
    return Faces(boxes[keep].cpu(), scores[keep].cpu(), points[keep].cpu())
