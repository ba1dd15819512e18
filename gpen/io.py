"""Image files <-> float RGB arrays, keeping what can be kept: bit depth, alpha, EXIF orientation."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageFormat:
    channels: int  # 1, 3 or 4
    bits: int  # 8 or 16


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, ImageFormat]:
    """(H,W,C) float32 RGB(A) or gray in 0..1, upright per EXIF, and the file's channels and depth."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ValueError(f"{path}: not an image OpenCV can read")
    if raw.ndim == 3 and raw.shape[2] == 4:
        image = cv2.cvtColor(raw, cv2.COLOR_BGRA2RGBA)  # alpha files: EXIF orientation is rare, not applied
    elif raw.ndim == 2:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)[..., None]
    else:  # IMREAD_COLOR applies the EXIF orientation
        image = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH), cv2.COLOR_BGR2RGB)
    bits = 16 if image.dtype == np.uint16 else 8
    scale = 65535.0 if bits == 16 else 255.0
    if image.dtype.kind == "f":
        scale = 1.0
    return image.astype(np.float32) / scale, ImageFormat(image.shape[2], bits)


def write_image(path: str | os.PathLike, image: np.ndarray, fmt: ImageFormat | None = None) -> None:
    """Write (H,W,C) float 0..1 in `fmt`'s depth (16-bit only where the file type holds it)."""
    path = Path(path)
    bits = fmt.bits if fmt else 8
    if bits == 16 and path.suffix.lower() not in (".png", ".tif", ".tiff"):
        bits = 8
    scale, dtype = (65535.0, np.uint16) if bits == 16 else (255.0, np.uint8)
    pixels = (np.clip(image, 0, 1) * scale + 0.5).astype(dtype)
    channels = pixels.shape[2]
    if channels == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    elif channels == 4:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGBA2BGRA)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), pixels):
        raise ValueError(f"{path}: OpenCV cannot write this file type")
