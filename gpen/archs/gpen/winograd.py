"""3x3 stride-1 convolution by Winograd's minimal filtering F(4x4, 3x3), for the CPU.

Each 4x4 block of output comes from a 6x6 input tile with 36 multiplies per channel pair instead of
144, as 36 batched matrix products. PyTorch's CPU convolutions (oneDNN) are direct: with AVX2 they
run at ~200 GFLOP/s on 2 cores and this cuts GPEN's wide low-resolution layers by a third to a half;
with AVX-512 they run twice as fast, the tile transforms do not, and this loses (measured on one Zen 5
with and without ONEDNN_MAX_CPU_ISA=AVX2). On narrow high-resolution layers the transforms cost more
than they save, and on GPUs cuDNN already does this. Error is ~1e-5 relative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cpu_fast import plain_wanted

# Lavin & Gray (2016), interpolation points 0, 1, -1, 2, -2 and infinity.
_BT = torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                    [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=torch.float64)
_G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                   [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
_AT = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                   dtype=torch.float64)
# The 2-D transforms of flattened tiles: Kronecker products of the 1-D ones.
INPUT_TRANSFORM = torch.kron(_BT, _BT).float()  # (36, 36)
WEIGHT_TRANSFORM = torch.kron(_G, _G).float()  # (36, 9)
OUTPUT_TRANSFORM = torch.kron(_AT, _AT).float()  # (16, 36)
MIN_CHANNELS = 256  # below this the transforms cost more than the multiplies they save
MIN_PIXELS = 64 * 64  # and on smaller maps the weight transform does
# glibc serves freed blocks under 32 MiB again from its heap; larger ones are mapped afresh each time,
# and faulting their pages in cost about a third of GPEN's CPU time. Work is cut into parts near this.
PART_BYTES = 16 * 2 ** 20
ENABLED = "AVX512" not in torch.backends.cpu.get_cpu_capability()


def worthwhile(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (ENABLED and x.device.type == "cpu" and x.dtype == torch.float32 and weight.shape[-2:] == (3, 3)
            and weight.shape[1] >= MIN_CHANNELS and x.shape[-2] % 4 == 0 and x.shape[-1] % 4 == 0
            and x.shape[-2] * x.shape[-1] >= MIN_PIXELS and not plain_wanted())


def conv3x3(x: torch.Tensor | tuple[torch.Tensor, ...], weight: torch.Tensor, out: torch.Tensor | None = None,
            part_bytes: int = PART_BYTES) -> torch.Tensor:
    """F.conv2d(x, weight, padding=1) for weight (O,C,3,3) and x (B,C,H,W) with H, W multiples of 4;
    x may be a tuple of maps that together are its C channels. Given `out`, the result is added
    into it.

    The result is in channels_last memory, like the rest of GPEN's feature maps. Tiles are taken a
    band of rows at a time, so that the tile transforms stay near `part_bytes`: blocks that the
    allocator reuses and the caches hold, where whole-map ones would be fresh pages every call.
    """
    parts = x if isinstance(x, tuple) else (x,)
    batch, _, height, width = parts[0].shape
    channels = [part.shape[1] for part in parts]
    out_channels = weight.shape[0]
    rows, cols = height // 4, width // 4
    widest = max(sum(channels), out_channels)
    band = max(1, part_bytes // (36 * batch * cols * widest * parts[0].element_size()))  # tile rows
    u = (WEIGHT_TRANSFORM @ weight.reshape(out_channels * sum(channels), 9).t()).view(36, out_channels, -1)
    us = u.transpose(1, 2).split(channels, dim=1)  # (36, C_i, O) each
    y = parts[0].new_empty(batch, height, width, out_channels) if out is None else out.permute(0, 2, 3, 1)
    for top in range(0, rows, band):
        bottom = min(rows, top + band)
        first, last = 4 * top - 1, 4 * bottom + 1  # the input rows these tiles read, padding included
        m = None
        for part, u_part in zip(parts, us):
            piece = F.pad(part[:, :, max(first, 0):min(last, height)], (1, 1, max(0, -first), max(0, last - height)))
            tiles = piece.unfold(2, 6, 4).unfold(3, 6, 4)  # (B, C, band, cols, 6, 6)
            tiles = tiles.permute(4, 5, 0, 2, 3, 1).reshape(36, -1)  # (36, B*band*cols*C)
            v = (INPUT_TRANSFORM @ tiles).view(36, -1, part.shape[1])  # (36, T, C)
            m = torch.bmm(v, u_part) if m is None else m.baddbmm_(v, u_part)  # (36, T, O)
        blocks = (OUTPUT_TRANSFORM @ m.view(36, -1)).view(4, 4, batch, bottom - top, cols, out_channels)
        blocks = blocks.permute(2, 3, 0, 4, 1, 5).reshape(batch, 4 * (bottom - top), width, out_channels)
        if out is None:
            y[:, 4 * top:4 * bottom] = blocks
        else:
            y[:, 4 * top:4 * bottom] += blocks
    return y.permute(0, 3, 1, 2)
