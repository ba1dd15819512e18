"""Measure a face detector's scores for real faces and for false ones: the evidence for its default threshold.

    python scripts/measure_thresholds.py [--detector PATH] [--photo PATH] [--floor 0.2]

Every photo is detected as the pipeline detects it (detect_size auto) at its own size, shrunk to 0.5x (area),
enlarged 2x (bilinear) and upscaled 2x and 4x (Lanczos, which sharpens texture into face-like patterns), with
the threshold lowered to `--floor` so that weak detections show. Each detection is labelled real or false:

- the Solvay photo (../shared/images): its 29 faces are the reference detector's boxes
  (../shared/fixtures/retinaface_solvay_1927.json); anything else found is false;
- scikit-image's bundled sample photos, when scikit-image is installed: astronaut and camera hold one face
  each (the boxes below, checked by eye); coffee, chelsea (a cat), rocket, horse, coins, brick, grass, gravel,
  hubble_deep_field, retina, clock, page, text, immunohistochemistry, cell, colorwheel, logo and moon hold none;
- scikit-image's LFW subset: 100 face crops and 100 non-face crops, 25 px, cut tight around the eyes, nose
  and mouth (no forehead, no chin), set 2x their side apart on grey and enlarged to 64 and 128 px (Lanczos).

Prints, per photo and version, the real faces found and the lowest real score, and the false detections with
their score and box side; then how many real and false detections each candidate threshold keeps, by face size.
Needs the pack, opencv-python and the two files from ../shared; about two minutes on a free 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.dont_write_bytecode = True  # leave no __pycache__ in the checkout

import gpen  # noqa: E402
from gpen.faces.detect import box_iou  # noqa: E402

SHARED = ROOT.parent / "shared"
VERSIONS = (("1x", 1, None), ("0.5x area", 0.5, cv2.INTER_AREA), ("2x bilinear", 2, cv2.INTER_LINEAR),
            ("2x Lanczos", 2, cv2.INTER_LANCZOS4), ("4x Lanczos", 4, cv2.INTER_LANCZOS4))
ONE_FACE = {"astronaut": [178, 60, 273, 180], "camera": [197, 115, 257, 198]}  # xyxy, at the photo's own size
NO_FACE = ("coffee", "chelsea", "rocket", "horse", "coins", "brick", "grass", "gravel", "hubble_deep_field",
           "retina", "clock", "page", "text", "immunohistochemistry", "cell", "colorwheel", "logo", "moon")
CANDIDATES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
SMALL = 24  # px: a box side under this is a "small" face (GPEN has little to restore there)
SAME_FACE = 0.3  # IoU with a labelled face that makes a detection that face


def photos(photo: Path) -> list[tuple[str, np.ndarray, torch.Tensor]]:
    """(name, RGB uint8 (H,W,3), the real faces' boxes (N,4) at that size)."""
    solvay = cv2.imread(str(photo), cv2.IMREAD_COLOR)[..., ::-1]
    faces = json.loads((SHARED / "fixtures" / "retinaface_solvay_1927.json").read_text())["faces"]
    found = [("solvay_1927", solvay, torch.tensor([f["box"] for f in faces]))]
    try:
        from skimage import data
    except ImportError:
        print("(scikit-image is not installed: its sample photos are left out)")
        return found
    for name in (*ONE_FACE, *NO_FACE):
        image = np.asarray(getattr(data, name)())
        image = image.astype(np.uint8) * 255 if image.dtype == bool else image  # horse is black and white
        image = np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3]
        found.append((name, image, torch.tensor([ONE_FACE[name]]) if name in ONE_FACE else torch.zeros(0, 4)))
    crops = data.lfw_subset()  # (200, 25, 25) float 0..1: 100 faces, then 100 non-faces
    for side in (64, 128):
        for label, half in (("faces", crops[:100]), ("non-faces", crops[100:])):
            grid, boxes = crop_grid(half, side)
            found.append((f"LFW {label} at {side} px", grid, boxes if label == "faces" else torch.zeros(0, 4)))
    return found


def crop_grid(crops: np.ndarray, side: int) -> tuple[np.ndarray, torch.Tensor]:
    """Grey crops enlarged to `side` on a 10-wide grid of 2*side cells, and their boxes."""
    cell = 2 * side
    grid = np.full((10 * cell, 10 * cell), 0.5, np.float32)
    boxes = []
    for k, crop in enumerate(crops):
        y, x = (k // 10) * cell + side // 2, (k % 10) * cell + side // 2
        grid[y:y + side, x:x + side] = cv2.resize(crop.astype(np.float32), (side, side),
                                                  interpolation=cv2.INTER_LANCZOS4)
        boxes.append([x, y, x + side, y + side])
    rgb = (np.repeat(grid[..., None], 3, -1).clip(0, 1) * 255).round().astype(np.uint8)
    return rgb, torch.tensor(boxes, dtype=torch.float32)


def labelled(detector, image: np.ndarray, real: torch.Tensor, floor: float) -> tuple[list, list]:
    """(scores and sides of the real faces found, of the false detections), sides in the image's pixels."""
    faces = detector.detect(torch.from_numpy(image.astype(np.float32) / 255)[None], threshold=floor)[0]
    sides = (faces.boxes[:, 2:] - faces.boxes[:, :2]).amin(1)
    is_real = box_iou(faces.boxes, real).amax(1) > SAME_FACE if len(real) and len(faces) else \
        torch.zeros(len(faces), dtype=torch.bool)
    pairs = lambda keep: [(float(s), float(z)) for s, z in zip(faces.scores[keep], sides[keep])]
    return pairs(is_real), pairs(~is_real)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detector", type=Path, default=SHARED / "models" / "retinaface_mobilenet0.25.pth")
    parser.add_argument("--photo", type=Path, default=SHARED / "images" / "solvay_1927.png")
    parser.add_argument("--floor", type=float, default=0.2, help="the threshold detections are collected at")
    args = parser.parse_args()
    detector = gpen.load_detector(args.detector, device="cpu")
    print(f"{detector.name}: detections at {args.floor} or more, per photo and version\n")
    print("| photo | version | real found (of) | lowest real: score, side | false: score, side (px) |")
    print("|---|---|---|---|---|")
    found = {"photos": ([], []), "LFW crops": ([], [])}  # (real, false) detections of each set
    for name, image, boxes in photos(args.photo):
        crops = name.startswith("LFW")
        for version, scale, interpolation in VERSIONS[:1] if crops else VERSIONS:  # the grids are enlarged already
            scaled = image if scale == 1 else cv2.resize(image, None, fx=scale, fy=scale, interpolation=interpolation)
            real, false = labelled(detector, scaled, boxes * scale, args.floor)
            found["LFW crops" if crops else "photos"][0].extend(real)
            found["LFW crops" if crops else "photos"][1].extend((s, z, f"{name} {version}") for s, z in false)
            lowest = f"{min(real)[0]:.3f}, {min(real)[1]:.0f}" if real else "-"
            shown = ", ".join(f"{s:.3f} ({z:.0f})" for s, z in sorted(false, reverse=True)[:4])
            more = f" and {len(false) - 4} more" if len(false) > 4 else ""
            print(f"| {name} | {version} | {len(real)} ({len(boxes)}) | {lowest} | {shown or '-'}{more} |")
    for label, (real, false) in found.items():
        summarise(label, real, false)


def summarise(label: str, real: list, false: list) -> None:
    """How many real and false detections each candidate threshold keeps, small faces apart."""
    print(f"\n{label}: real faces lost and false ones kept at each threshold, by box side (small: under {SMALL} px)\n")
    print("| threshold | real lost, small | real lost, larger | false kept, small | false kept, larger |")
    print("|---|---|---|---|---|")
    groups = [[s for s, z, *_ in found if (z < SMALL) == small] for found in (real, false) for small in (True, False)]
    for t in CANDIDATES:
        lost = [f"{sum(s <= t for s in scores)} of {len(scores)}" for scores in groups[:2]]
        kept = [f"{sum(s > t for s in scores)} of {len(scores)}" for scores in groups[2:]]
        print(f"| {t:g} | {' | '.join(lost + kept)} |")
    larger = groups[1]
    print(f"\nLowest real face {SMALL} px or larger: {min(larger):.3f}" if larger else "")
    print("Highest false detections: " + "; ".join(f"{s:.3f} ({z:.0f} px, {where})"
                                                  for s, z, where in sorted(false, reverse=True)[:6]))


if __name__ == "__main__":
    main()
