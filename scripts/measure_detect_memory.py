"""Peak memory of one detection pass with RetinaFace ResNet-50 (random weights) at fixed detect_size values.

    python scripts/measure_detect_memory.py [--frame 1920x1080] [--sizes 1024,2048,4096,8192]

Each size runs in a child process of its own (glibc defaults) and reports the peak resident memory above
what the process held before detecting, and the seconds the pass took.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(width: int, height: int, detect_size: int) -> None:
    import torch

    from gpen.archs.retinaface import RetinaFace
    from gpen.faces.detect import detector_handle

    torch.manual_seed(0)
    net = RetinaFace("resnet50").eval()
    net.info = None
    detector = detector_handle(net, torch.device("cpu"), detect_size)
    frame = torch.rand(1, height, width, 3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    detector.detect(frame)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"detect_size": detect_size, "peak_mb": (peak - before) / 1024, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frame", default="1920x1080")
    parser.add_argument("--sizes", default="1024,2048,4096,8192")
    args = parser.parse_args()
    width, height = map(int, args.frame.split("x"))
    print(f"RetinaFace resnet50, CPU, one {width}x{height} frame")
    print("| detect_size | peak above the loaded model (MB) | s |")
    print("|---|---|---|")
    for size in map(int, args.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--child", f"{width},{height},{size}"],
                             capture_output=True, text=True)
        if out.returncode:
            print(f"| {size} | failed: {out.stderr.strip().splitlines()[-1]} | |")
            continue
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {size} | {figures['peak_mb']:.0f} | {figures['seconds']:.1f} |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(*map(int, sys.argv[2].split(",")))
    else:
        main()
