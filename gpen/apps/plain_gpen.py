"""The reference FullGenerator's computation (yangxy/GPEN, face_model/gpen_model.py, its pure-PyTorch path)
run with the weights of our `GPEN` module: what the acceptance check times ours against on the same GPU.

Each face's style modulates its own copy of every convolution weight, run as one grouped convolution;
blurs and upsampling are upfirdn2d's zero insertion, padding and 2-D filter; maps stay NCHW in the
input's dtype; nothing is folded, fused, written in place or kept channels_last. It reproduces the
reference to float tolerance (tests/test_acceptance.py checks it on the shared reference fixture).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..archs.gpen.network import GPEN, LRELU_GAIN, LRELU_SLOPE, EqualLinear, ModulatedConv2d


def plain_forward(model: GPEN, x: torch.Tensor) -> torch.Tensor:
    """model(x) as the reference computes it: NCHW RGB in [-1, 1] -> the restored faces, the same."""
    x = x.to(model.ecd0[0][-2].weight.dtype).contiguous()
    features = []
    for i in range(model.n_encoders):
        layer = getattr(model, f"ecd{i}")[0]
        *blurs, conv, act = layer
        for blur in blurs:  # before a downsampling convolution
            x = upfirdn2d(x, blur.kernel, pad=(blur.pad, blur.pad))
        weight = (conv.weight * conv.scale).contiguous().to(x.dtype)
        x = leaky(F.conv2d(x, weight, stride=2 if layer.downsample else 1, padding=layer.padding), act.bias)
        features.append(x)
    latent = linear(model.final_linear[0], x.reshape(len(x), -1).float())
    g = model.generator
    w = latent * torch.rsqrt(latent.square().mean(1, keepdim=True) + 1e-8)  # PixelNorm
    for layer in list(g.style)[1:]:
        w = linear(layer, w)
    features = features[::-1]
    out = g.input.input.to(x.dtype).repeat(len(x), 1, 1, 1)
    out = styled_conv(g.conv1, out, w, features[0])
    skip = to_rgb(g.to_rgb1, out, w, None)
    for conv_up, conv, rgb, feature in zip(g.convs[::2], g.convs[1::2], g.to_rgbs, features[1:]):
        out = styled_conv(conv, styled_conv(conv_up, out, w, feature), w, feature)
        skip = to_rgb(rgb, out, w, skip)
    return skip


def leaky(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The reference's fused_leaky_relu: sqrt(2) * leaky_relu(x + bias)."""
    return F.leaky_relu(x + bias.to(x.dtype).view(1, -1, *[1] * (x.ndim - 2)), LRELU_SLOPE) * LRELU_GAIN


def linear(layer: EqualLinear, x: torch.Tensor) -> torch.Tensor:
    out = F.linear(x, layer.weight.float() * layer.scale)
    bias = layer.bias.float() * layer.lr_mul
    return leaky(out, bias) if layer.activation else out + bias


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """upfirdn2d_native for down=1: zeros inserted after each sample, padded, filtered channel by channel."""
    n, c, h, w = x.shape
    x = x.reshape(n * c, 1, h, 1, w, 1)
    x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1]).reshape(n * c, 1, h * up, w * up)
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    x = F.conv2d(x, kernel.flip(0, 1).to(x.dtype)[None, None])
    return x.reshape(n, c, x.shape[-2], x.shape[-1])


def modulated_conv(layer: ModulatedConv2d, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = x.shape
    s = linear(layer.modulation, style).view(batch, 1, channels, 1, 1)
    weight = layer.scale * layer.weight.float().contiguous() * s  # (B, O, C, k, k)
    if layer.demodulate:
        weight = weight * torch.rsqrt(weight.square().sum((2, 3, 4)) + 1e-8).view(batch, -1, 1, 1, 1)
    weight, x = weight.to(x.dtype), x.reshape(1, batch * channels, height, width)
    k = layer.kernel_size
    if layer.upsample:
        weight = weight.transpose(1, 2).reshape(batch * channels, layer.out_channel, k, k)
        out = F.conv_transpose2d(x, weight, stride=2, groups=batch)
        out = out.reshape(batch, layer.out_channel, out.shape[-2], out.shape[-1])
        return upfirdn2d(out, layer.blur.kernel, pad=(layer.blur.pad, layer.blur.pad))
    out = F.conv2d(x, weight.reshape(batch * layer.out_channel, channels, k, k), padding=layer.padding, groups=batch)
    return out.reshape(batch, layer.out_channel, height, width)


def styled_conv(layer, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """GPEN's StyledConv: the modulated convolution, the encoder feature concatenated (scaled), activated."""
    out = modulated_conv(layer.conv, x, style)
    return leaky(torch.cat((out, layer.noise.weight.to(noise.dtype) * noise), 1), layer.activate.bias)


def to_rgb(layer, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    out = modulated_conv(layer.conv, x, style) + layer.bias.to(x.dtype)
    if skip is None:
        return out
    # The reference's Upsample: zeros inserted, then its 4-tap kernel (gain 4) with padding (2, 1).
    return out + upfirdn2d(skip, layer.upsample.kernel, up=2, pad=(2, 1))
