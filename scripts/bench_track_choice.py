"""What choosing face tracks costs: CPU time a frame of select_tracks (max_faces / indices on video frames).

    python scripts/bench_track_choice.py [--frames 100] [--faces PATH]

The faces are the 29 of the Solvay photo as the shared RetinaFace fixture lists them (../shared by default),
panning 3 px a frame with a pixel of random jitter, as a detector would report them: only the choice is timed,
not detection. Prints the milliseconds a frame for each of a few options.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpen import SelectOptions  # noqa: E402
from gpen.faces.detect import Faces  # noqa: E402
from gpen.faces.pipeline import select_faces, select_tracks  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def panning_faces(path: Path, frames: int) -> list[Faces]:
    faces = json.loads(path.read_text())["faces"]
    boxes, scores = torch.tensor([f["box"] for f in faces]), torch.tensor([f["score"] for f in faces])
    landmarks = torch.tensor([f["landmarks"] for f in faces])
    noise = torch.Generator().manual_seed(0)
    return [select_faces(Faces(boxes + torch.randn(boxes.shape, generator=noise) - 3 * t, scores, landmarks - 3 * t))
            for t in range(frames)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--faces", type=Path, default=SHARED / "fixtures" / "retinaface_solvay_1927.json")
    args = parser.parse_args()
    faces = panning_faces(args.faces, args.frames)
    for options in (SelectOptions(max_faces=3), SelectOptions(max_faces=3, order="confidence"),
                    SelectOptions(indices="0,5", order="left-right"), SelectOptions(max_faces=3, temporal_sigma=2)):
        start = time.perf_counter()
        select_tracks(faces, options)
        seconds = time.perf_counter() - start
        print(f"{len(faces[0])} faces a frame, max_faces {options.max_faces}, indices {options.indices or '-'}, "
              f"order {options.order}, temporal_sigma {options.temporal_sigma:g}: "
              f"{seconds / len(faces) * 1000:.1f} ms a frame")


if __name__ == "__main__":
    main()
