"""3x3 stride-1 convolution by Winograd's minimal filtering F(4x4, 3x3), for the CPU.

Each 4x4 block of output comes from a 6x6 input tile with 36 multiplies per channel pair instead of
144, as 36 batched matrix products. PyTorch's CPU convolutions (oneDNN on AVX2) are direct, so on
GPEN's wide low-resolution layers this halves the time; on narrow high-resolution ones the tile
transforms cost more than they save, and on GPUs cuDNN already does this. Error is ~1e-5 relative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def worthwhile(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.shape[-2:] == (3, 3)
            and weight.shape[1] >= MIN_CHANNELS and x.shape[-2] % 4 == 0 and x.shape[-1] % 4 == 0)


def conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.conv2d(x, weight, padding=1) for weight (O,C,3,3) and x (B,C,H,W) with H, W multiples of 4.

    The result is in channels_last memory, like the rest of GPEN's feature maps.
    """
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    rows, cols = height // 4, width // 4
    tiles = F.pad(x, (1, 1, 1, 1)).unfold(2, 6, 4).unfold(3, 6, 4)  # (B, C, rows, cols, 6, 6)
    tiles = tiles.permute(4, 5, 0, 2, 3, 1).reshape(36, -1)  # (36, B*rows*cols*C)
    v = (INPUT_TRANSFORM @ tiles).view(36, -1, channels)  # (36, T, C)
    u = (WEIGHT_TRANSFORM @ weight.reshape(out_channels * channels, 9).t()).view(36, out_channels, channels)
    m = torch.bmm(v, u.transpose(1, 2))  # (36, T, O)
    y = (OUTPUT_TRANSFORM @ m.view(36, -1)).view(4, 4, batch, rows, cols, out_channels)
    return y.permute(2, 3, 0, 4, 1, 5).reshape(batch, height, width, out_channels).permute(0, 3, 1, 2)
