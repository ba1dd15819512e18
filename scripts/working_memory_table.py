"""GPEN's working memory by size and batch, counted on the meta device (gpen/archs/working_memory.py): what the
nodes tell ComfyUI a face batch needs beyond the weights. No GPU and no weights are needed (the networks are
built on the meta device); a few seconds.

    python scripts/working_memory_table.py [--dtype fp16] [--sizes 256 512 1024 2048] [--batches 1 4 8]

Prints a markdown table (MiB): the weights, then for each batch the forward's working memory, and the whole
estimate, weights + input + working, which a GPU's torch.cuda.max_memory_allocated for that forward is
compared with by `python -m gpen bench --acceptance` (its memory section).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpen.apps.bench import STANDARD_CONFIGS
from gpen.archs.gpen.network import GPEN
from gpen.archs.working_memory import forward_bytes, weight_bytes
from gpen.devices import DTYPES

MIB = 2 ** 20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    args = p.parse_args()
    dtype = DTYPES[args.dtype]
    print(f"| GPEN ({args.dtype}) | weights | " + " | ".join(f"batch {b}: working / estimate" for b in args.batches)
          + " |")
    print("|---|---:|" + "---:|" * len(args.batches))
    for size in args.sizes:
        channel_multiplier, narrow = STANDARD_CONFIGS.get(size, (2, 1))  # the released files' widths
        with torch.device("meta"):
            network = GPEN(size, channel_multiplier=channel_multiplier, narrow=narrow).to(dtype)
        weights = weight_bytes(network)
        cells = []
        for batch in args.batches:
            shape = (batch, 3, size, size)
            working = forward_bytes(network, shape, dtype)
            estimate = weights + batch * 3 * size * size * dtype.itemsize + working
            cells.append(f"{working / MIB:.0f} / {estimate / MIB:.0f}")
        print(f"| {size} | {weights / MIB:.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
