"""What GPEN Restore SEGS costs beside GPEN Face Restore, outside the restorer: seconds per image on the 1927
Solvay photo (29 faces), with a restorer that returns the crops (so only the pipeline is timed).

    python scripts/measure_segs.py [--detector ../shared/models/retinaface_mobilenet0.25.pth] [--runs 3]

Rows: restore_faces (detect the frame, align, paste); restore_segs on our detector's SEGS with the landmarks
they carry (align, paste each segment in its window); restore_segs finding each segment's face again (a
YOLO detector's SEGS: one detection per segment, in its box enlarged twice); FaceSegmentDetector.detect
(FaceDetailer's call). Medians of --runs, after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gpen  # noqa: E402
from gpen.faces.restore import IdentityRestorer  # noqa: E402
from gpen.faces.segs import FaceSegmentDetector, restore_segs  # noqa: E402

SHARED = ROOT.parent / "shared"


def median_seconds(run, runs: int) -> float:
    run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--detector", type=Path, default=SHARED / "models" / "retinaface_mobilenet0.25.pth")
    p.add_argument("--image", type=Path, default=SHARED / "images" / "solvay_1927.png")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    pixels, _ = gpen.read_image(args.image)
    image = torch.from_numpy(np.ascontiguousarray(pixels[..., :3]))[None].float()
    detector = gpen.load_detector(args.detector, device="cpu")
    segs = FaceSegmentDetector(detector).detect(image, 0.5, 10, 3.0, 10)
    boxes_only = segs[0], [seg._replace(bbox=np.asarray(seg.bbox).copy()) for seg in segs[1]]  # no landmarks
    rows = {
        "restore_faces (GPEN Face Restore)": lambda: gpen.restore_faces(image, IdentityRestorer(), detector),
        "restore_segs, landmarks from our SEGS": lambda: restore_segs(image, segs, IdentityRestorer()),
        "restore_segs, each segment's face found again": lambda: restore_segs(image, boxes_only, IdentityRestorer(), detector),
        "FaceSegmentDetector.detect (FaceDetailer's call)": lambda: FaceSegmentDetector(detector).detect(
            image, 0.5, 10, 3.0, 10),
    }
    print(f"{args.image.name} {image.shape[2]}x{image.shape[1]}, {len(segs[1])} faces, {torch.get_num_threads()} "
          f"threads, median of {args.runs}")
    for name, run in rows.items():
        print(f"{name:52s} {median_seconds(run, args.runs):7.3f} s")


if __name__ == "__main__":
    main()
