"""Seconds a face to feather a parse mask (faces/masks.feather_inside), by crop size and parse_feather.

    python scripts/measure_feathering.py [--sizes 512,1024,2048] [--feathers 0.01,0.1] [--repeat 3]

Times the gpen package it imports (PYTHONPATH picks the checkout: run it on two to compare them). The mask is
a face parser's kind: blocks of face and not-face, with occluder-like soft values. Best of --repeat.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if "gpen" not in sys.modules:
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: a checkout named there wins
from gpen.faces.masks import feather_inside  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,1024,2048")
    parser.add_argument("--feathers", default="0.01,0.1")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"feather_inside from {Path(sys.modules['gpen'].__file__).parent}, {torch.get_num_threads()} threads")
    print("| crop | parse_feather | s a face |")
    print("|---|---|---|")
    torch.manual_seed(0)
    for size in map(int, args.sizes.split(",")):
        blocks = (torch.rand(1, 1, 16, 16) > 0.3).float()
        mask = F.interpolate(blocks, size=(size, size), mode="nearest")[:, 0] * torch.rand(1, size, size).clamp(min=0.5)
        for feather in map(float, args.feathers.split(",")):
            best = float("inf")
            for _ in range(args.repeat):
                start = time.perf_counter()
                feather_inside(mask, feather)
                best = min(best, time.perf_counter() - start)
            print(f"| {size} | {feather:g} | {best:.2f} |", flush=True)


if __name__ == "__main__":
    main()
