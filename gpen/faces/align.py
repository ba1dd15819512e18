"""Aligning faces to a 5-point template, and warping between image and crop, batched on the device.

Affines are (N,2,3) and map image pixel coordinates to crop pixel coordinates, OpenCV's convention
(pixel centres at integer coordinates), so `cv2.warpAffine(image, affine, (S, S))` gives the same crop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .options import TEMPLATES
from .tensors import check_frames

# GPEN's own template, as fractions of the crop size: align_faces.py's 96x112 reference points,
# squared to 112x112 (x + 8) with inner padding 0.25 (+ 28, in a 168x168 frame). GPEN was trained on it.
GPEN_TEMPLATE = tuple(((x + 8 + 28) / 168, (y + 28) / 168) for x, y in (
    (30.29459953, 51.69630051), (65.53179932, 51.50139999), (48.02519989, 71.73660278),
    (33.54930115, 92.3655014), (62.72990036, 92.20410156)))
# The FFHQ template of facexlib, ReActor and FaceFusion (their 512x512 points / 512).
FFHQ_TEMPLATE = ((192.98138 / 512, 239.94708 / 512), (318.90277 / 512, 240.1936 / 512),
                 (256.63416 / 512, 314.01935 / 512), (201.26117 / 512, 371.41043 / 512),
                 (313.08905 / 512, 371.15118 / 512))
TEMPLATE_POINTS = {"gpen": GPEN_TEMPLATE, "ffhq": FFHQ_TEMPLATE}  # by the names options.TEMPLATES offers
SAMPLED_AT_ONCE = 1 << 19  # output pixels warped at a time (sample): ~16 MB of source coordinates


def template_points(size: int, template: str = "gpen") -> torch.Tensor:
    if template not in TEMPLATE_POINTS:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    return torch.tensor(TEMPLATE_POINTS[template], dtype=torch.float64) * size


def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (Umeyama 1991) taking points src (N,K,2) onto dst (K,2): (N,2,3)."""
    src, dst = src.double(), dst.double().to(src.device).expand_as(src)
    src_mean, dst_mean = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.transpose(1, 2) @ src_c / src.shape[1]
    u, s, vh = torch.linalg.svd(cov)
    d = torch.ones_like(s)
    d[:, -1] = torch.sign(torch.linalg.det(cov)).where(torch.linalg.det(cov) != 0, torch.ones(()).double())
    rotation = u @ torch.diag_embed(d) @ vh
    scale = (s * d).sum(1) / src_c.square().sum((1, 2)).div(src.shape[1]).clamp(min=1e-12)
    linear = rotation * scale[:, None, None]
    translation = dst_mean.transpose(1, 2) - linear @ src_mean.transpose(1, 2)
    return torch.cat([linear, translation], 2)


def invert_affine(affine: torch.Tensor) -> torch.Tensor:
    linear = torch.linalg.inv(affine[..., :2].double())
    return torch.cat([linear, -linear @ affine[..., 2:].double()], -1).to(affine.dtype)


def warp(image: torch.Tensor, affine: torch.Tensor, height: int, width: int, mode: str = "bicubic") -> torch.Tensor:
    """cv2.warpAffine for a batch on the tensor's device.

    image (C,H,W) or (N,C,H,W), shared by or one per affine; affine (N,2,3) maps source pixels to
    output pixels. Returns (N,C,height,width), zero outside the source.
    """
    return sample(image, invert_affine(affine.double()), height, width, mode)


def sample(image: torch.Tensor, inverse: torch.Tensor, height: int, width: int, mode: str = "bicubic",
           out: torch.Tensor | None = None) -> torch.Tensor:
    """warp through `inverse` (N,2,3), the map from output pixels to source pixels, into `out` (N,C,height,width)
    if given. An inverse already on the image's device is used there: a small tensor copied to a GPU is a wait
    for it, and a face each a wait each. The output is made SAMPLED_AT_ONCE pixels at a time: its float64
    source coordinates take ~32 bytes a pixel (a 2048 crop's, 128 MB at once)."""
    inverse = inverse.to(image.device, torch.float64)
    if out is None:
        out = torch.empty(len(inverse), image.shape[-3], height, width, dtype=image.dtype, device=image.device)
    if not out.numel():
        return out
    rows = max(1, SAMPLED_AT_ONCE // (width * max(len(inverse), 1)))
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        out[:, :, top:bottom] = _sample_rows(image, inverse, top, bottom, width, mode)
    return out


def _sample_rows(image: torch.Tensor, inverse: torch.Tensor, top: int, bottom: int, width: int,
                 mode: str) -> torch.Tensor:
    """sample's output rows top..bottom."""
    ys = torch.arange(top, bottom, dtype=torch.float64, device=image.device)[None, :, None]
    xs = torch.arange(width, dtype=torch.float64, device=image.device)[None, None, :]
    (a, b, c), (d, e, f) = inverse[:, 0, :, None, None].unbind(1), inverse[:, 1, :, None, None].unbind(1)
    src_h, src_w = image.shape[-2:]
    grid = torch.stack([(a * xs + b * ys + c) * 2 / max(src_w - 1, 1) - 1,
                        (d * xs + e * ys + f) * 2 / max(src_h - 1, 1) - 1], -1).to(image.dtype)  # (N, rows, W, 2)
    if image.ndim == 3:
        # One source for every affine: stack the grids along the height, so the image is not copied.
        out = F.grid_sample(image[None], grid.reshape(1, -1, width, 2), mode=mode, padding_mode="zeros",
                            align_corners=True)
        return out.reshape(image.shape[0], len(inverse), bottom - top, width).transpose(0, 1)
    return F.grid_sample(image, grid, mode=mode, padding_mode="zeros", align_corners=True)


def crop_faces(images: torch.Tensor, landmarks: torch.Tensor, size: int, frames: torch.Tensor | None = None,
               template: str = "gpen", device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned RGB face crops.

    images (B,H,W,C) float, C = 1, 3 or 4; landmarks (N,5,2) pixels; frames (N,) the frame of each face
    (may be left out when B is 1). Returns crops (N,size,size,3) float32 in 0..1 on `device` (default:
    the images') and affines (N,2,3) image -> crop pixels, float32. Frames go to the device one at a time.
    """
    check_frames(images)
    landmarks = torch.as_tensor(landmarks)
    frames = frames_of(images, len(landmarks), frames)
    affines = face_affines(landmarks, size, template)
    return cut_faces(images, affines, frames, size, device), affines


def face_affines(landmarks: torch.Tensor, size: int, template: str = "gpen") -> torch.Tensor:
    """(N,2,3) float32 affines (image -> crop pixels) taking landmarks (N,5,2) onto `template` in crops of `size`.
    Crops are cut through these float32 affines, so that the same crops can be cut again from them exactly."""
    landmarks = torch.as_tensor(landmarks)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (5, 2):
        raise ValueError(f"landmarks must be (N, 5, 2), got shape {tuple(landmarks.shape)}")
    return similarity_transform(landmarks.cpu(), template_points(size, template)).float()


def cut_faces(images: torch.Tensor | FramesOn, affines: torch.Tensor, frames: torch.Tensor, size: int,
              device: torch.device | None = None) -> torch.Tensor:
    """(N,size,size,3) crops of `images` through `affines` (image -> crop pixels), float32 in 0..1: what
    crop_faces cuts, and, given its affines again, the very same crops."""
    return warp_faces(images, affines, frames, size, device).clamp_(0, 1).permute(0, 2, 3, 1)


def warp_faces(images: torch.Tensor | FramesOn, affines: torch.Tensor, frames: torch.Tensor, size: int,
               device: torch.device | str | None = None) -> torch.Tensor:
    """(N,3,size,size) float32 RGB crops through affines (N,2,3) from images (B,H,W,C), each from its
    frame, on `device` (default: the images'); or from frames already on their way there (FramesOn: its
    device), which cuts one batch after another from the same frame keep from copying it again."""
    source = images if isinstance(images, FramesOn) else FramesOn(images, device)
    crops = torch.zeros(len(affines), 3, size, size, device=source.device)  # zeros: a frame's faces fill it
    inverses = invert_affine(affines.double()).to(source.device)  # moved once, not a face at a time
    for frame in frames.unique().tolist():
        planes = source.planes(frame)
        # A face at a time: the sampling grids of many faces at once would outweigh the frame.
        for i in (frames == frame).nonzero().flatten().tolist():
            sample(planes, inverses[i:i + 1], size, size, out=crops[i:i + 1])
    return crops


class FramesOn:
    """The frames of `images` (B,H,W,C) as float RGB planes (3,H,W) on `device` (default: the images'), the
    last one asked for kept there: with frames on the CPU and networks on a GPU (ComfyUI's way), the faces of one
    frame are cut and colour-matched batch after batch from one copy of it, not a copy a batch or a face. On a
    video, where a batch spans frames, cutting and colour correction each copy a frame (one is kept, not a batch's)."""

    def __init__(self, images: torch.Tensor, device: torch.device | str | None = None):
        self.images = images
        self.device = torch.device(device) if device is not None else images.device
        self.frame, self.last = None, None

    def planes(self, frame: int) -> torch.Tensor:
        if frame != self.frame:
            self.frame, self.last = None, None  # the last one let go before the next comes
            self.last, self.frame = rgb_planes(self.images[frame].to(self.device)), frame
        return self.last


def rgb_planes(image: torch.Tensor) -> torch.Tensor:
    """(3,H,W) float32 RGB of an (H,W,C) image, C = 1, 3 or 4: a view where the image allows it, since
    warping samples only a few pixels of a large frame (crops are clamped afterwards)."""
    planes = image.permute(2, 0, 1)
    return (planes[:3] if len(planes) >= 3 else planes.expand(3, -1, -1)).float()


def frames_of(images: torch.Tensor, count: int, frames: torch.Tensor | None) -> torch.Tensor:
    if frames is None:
        if len(images) != 1 and count:
            raise ValueError("frames must say which image each face is in when images holds several")
        return torch.zeros(count, dtype=torch.long)
    frames = torch.as_tensor(frames, dtype=torch.long).cpu()
    if len(frames) != count or (count and (frames.min() < 0 or frames.max() >= len(images))):
        raise ValueError(f"frames must give an image index (0..{len(images) - 1}) for each of the {count} faces")
    return frames
