"""GPEN: the GAN-prior embedded network (Yang et al., CVPR 2021), in one file.

Parameter and buffer names follow the reference FullGenerator (yangxy/GPEN, face_model/gpen_model.py)
so that the released GPEN-BFR checkpoints load with strict key matching. The forward pass is
written for inference speed rather than as a transcript of the reference:

- one style vector for every layer (GPEN never mixes styles), so each layer's modulation is a
  single linear map of it;
- at batch 1 the style and the demodulation are folded into the convolution weight, so every
  convolution is a plain dense one (no grouped convolution); at larger batches the input is
  modulated instead and the output demodulated, again with plain convolutions;
- the fixed FIR blur runs as a depthwise convolution instead of upfirdn2d's reshapes;
- feature maps are channels_last, and wide 3x3 layers on the CPU use Winograd (winograd.py);
- on the CPU (batch 1: a batch goes face by face there), layers write into a workspace the model
  keeps (workspace.py), in place (../cpu_fast.py): the concatenations with the encoder's features are never made
  (each half is convolved with its half of the weight) and the transposed convolutions are made
  from their four phases;
- convolution weights are kept channels_last in memory (`conv_weight`), as oneDNN takes them;
- styles, modulations and demodulation coefficients are computed in float32 whatever the weights'
  dtype, so float16 cannot overflow in the sums of squares.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn
from torch.nn import functional as F

from .. import cpu_fast
from ..cpu_fast import conv_into, fill_bias_
from . import winograd, workspace
from .workspace import Workspace

BLUR_KERNEL = (1, 3, 3, 1)
LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2)


def channel_widths(channel_multiplier: float, narrow: float) -> dict[int, int]:
    """Feature channels at each resolution, exactly as the reference computes them."""
    base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier,
            128: 128 * channel_multiplier, 256: 64 * channel_multiplier,
            512: 32 * channel_multiplier, 1024: 16 * channel_multiplier,
            2048: 8 * channel_multiplier}
    return {res: int(c * narrow) for res, c in base.items()}


def make_blur_kernel(gain: float = 1.0) -> torch.Tensor:
    # Python arithmetic (exact here): tensor arithmetic on the meta device, where loading checks a
    # file against the architecture, would first import torch._dynamo, about a second.
    total = sum(BLUR_KERNEL) ** 2
    return torch.tensor([[a * b / total * gain for b in BLUR_KERNEL] for a in BLUR_KERNEL], dtype=torch.float32)


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """sqrt(2) * leaky_relu(x + bias): StyleGAN2's biased activation, in place on x."""
    return leaky_relu_gain_(x.add_(bias.to(x.dtype).view(1, -1, *([1] * (x.ndim - 2)))))


def leaky_relu_gain_(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu_(x, LRELU_SLOPE).mul_(LRELU_GAIN)


def conv_weight(*shape: int) -> nn.Parameter:
    """A random convolution weight of the checkpoints' shape (..., out, in, k, k), kept in memory as
    (..., out, k, k, in): channels_last, the layout oneDNN's CPU convolutions take without a copy,
    in which the taps of a kernel are dense (out, in) slices. Loading copies into this layout."""
    *outer, channels, height, width = shape
    return nn.Parameter(torch.randn(*outer, height, width, channels).movedim(-1, -3))


def modulate(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """weight (O,C,k,k) times scale (O,C), worked in float32, in weight's dtype and memory layout."""
    return (weight.float() * scale[:, :, None, None]).to(weight.dtype)


def blur(x: torch.Tensor, kernel: torch.Tensor, pad: int) -> torch.Tensor:
    """The reference's upfirdn2d(up=1, down=1, pad=(pad, pad)) as a depthwise convolution."""
    return F.conv2d(x, blur_weight(kernel, x), padding=pad, groups=x.shape[1])


def blur_weight(kernel: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The depthwise convolution weight that blurs each of x's channels with `kernel`."""
    return kernel.flip(0, 1).to(x.dtype)[None, None].expand(x.shape[1], 1, *kernel.shape)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate; optionally followed by the biased activation."""

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Always in float32: these layers are small and feed the demodulation. The scale goes on the
        output, a few hundred numbers, rather than on the weight (4M at GPEN-512's final_linear)."""
        out = F.linear(x.float(), self.weight.float()).mul_(self.scale)
        bias = self.bias.float() * self.lr_mul
        return fused_leaky_relu(out, bias) if self.activation else out.add_(bias)


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


class Blur(nn.Module):
    def __init__(self, pad: int, gain: float = 1.0):
        super().__init__()
        self.register_buffer("kernel", make_blur_kernel(gain))
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blur(x, self.kernel, self.pad)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's style-modulated convolution, optionally a 2x transposed (upsampling) one."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False):
        super().__init__()
        self.in_channel, self.out_channel, self.kernel_size = in_channel, out_channel, kernel_size
        self.upsample = upsample
        self.demodulate = demodulate
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.weight = conv_weight(1, out_channel, in_channel, kernel_size, kernel_size)
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)
        if upsample:
            # The transposed conv's output is 2h+1 wide; the blur (4 taps, padding 1) brings it to 2h.
            self.blur = Blur(pad=1, gain=4)

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...], style: torch.Tensor,
                out: torch.Tensor | None = None, space: Workspace | None = None) -> torch.Tensor:
        """The modulated convolution of x. On the workspace path (CPU, batch 1) x may be a tuple of
        maps that together are its channels (a concatenation never made), and given `out`, the
        result is added into it."""
        s = self.modulation(style) * self.scale  # (B, in), float32
        weight = self.weight[0]  # (out, in, k, k), channels_last
        demod = None
        if self.demodulate:  # sum over (in, k, k) of (weight * s)^2, without forming weight * s
            energy = weight.float().square().sum((2, 3))  # (vector_norm is slow on channels_last)
            demod = torch.rsqrt(s.square() @ energy.t() + 1e-8)
        parts = x if isinstance(x, tuple) else (x,)
        if out is not None or parts[0].shape[0] == 1 and weight.numel() < sum(part.numel() for part in parts):
            # At batch 1 style and demodulation fold into the weight: cheaper than touching the
            # activations where those are the larger, and the way of the workspace path (given out).
            scale = s.view(1, -1) if demod is None else demod.view(-1, 1) * s.view(1, -1)
            if out is None and len(parts) == 1:
                return self._conv(x, modulate(weight, scale))
            if out is None:
                out = torch.empty(self._out_shape(parts[0]), dtype=weight.dtype, device=weight.device,
                                  memory_format=torch.channels_last).zero_()
            return self._conv_into(out, parts, weight, scale, space)
        x = torch.cat(parts, 1)
        result = self._conv(x * s.to(x.dtype)[:, :, None, None], weight.to(x.dtype))
        result = result if demod is None else result.mul_(demod.to(result.dtype)[:, :, None, None])
        return result if out is None else out.add_(result)

    def _out_shape(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        factor = 2 if self.upsample else 1
        return x.shape[0], self.out_channel, factor * x.shape[2], factor * x.shape[3]

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            return self.blur(F.conv_transpose2d(x, weight.transpose(0, 1), stride=2))
        if winograd.worthwhile(x, weight):
            return winograd.conv3x3(x, weight)
        return F.conv2d(x, weight, padding=self.padding)

    def _conv_into(self, out: torch.Tensor, parts: tuple[torch.Tensor, ...], weight: torch.Tensor,
                   scale: torch.Tensor, space: Workspace | None) -> torch.Tensor:
        """out += the convolution of the parts' channels by the weight modulated by scale (O,C), each
        part convolved with its slice of the weight and written straight into out (oneDNN adds into
        a dense destination in place)."""
        if not self.upsample and winograd.worthwhile(parts[0], weight):
            return winograd.conv3x3(parts, modulate(weight, scale), out)
        bounds = [0, *itertools.accumulate(part.shape[1] for part in parts)]
        slices = [slice(start, stop) for start, stop in zip(bounds, bounds[1:])]
        if not self.upsample:
            for part, channels in zip(parts, slices):
                conv_into(out, part, modulate(weight[:, channels], scale[:, channels]), (self.padding, self.padding))
            return out
        # The transposed convolution's output T (2h+1 square) by its four phases, each an ordinary
        # convolution: an even row 2m of T takes kernel row 2 from x's row m-1 and kernel row 0 from
        # row m, an odd row 2m+1 kernel row 1 from row m; columns alike. Each phase is made in a
        # dense block of its own, then set into T's even or odd rows and columns.
        batch, _, height, width = parts[0].shape
        t = space.take("t", (batch, weight.shape[0], 2 * height + 1, 2 * width + 1), parts[0])
        phases = ((0, [2, 0], 1, height + 1), (1, [1], 0, height))
        for row, row_taps, row_pad, rows in phases:
            for col, col_taps, col_pad, cols in phases:
                phase = space.take("phase", (batch, weight.shape[0], rows, cols), parts[0]).zero_()
                for part, channels in zip(parts, slices):
                    taps = phase_weight(weight[:, channels], scale[:, channels], row_taps, col_taps)
                    conv_into(phase, part, taps, (row_pad, col_pad))
                t[:, :, row::2, col::2] = phase
        return conv_into(out, t, blur_weight(self.blur.kernel, t), (self.blur.pad, self.blur.pad), groups=t.shape[1])


def phase_weight(weight: torch.Tensor, scale: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """modulate(weight, scale)[:, :, rows][:, :, :, cols], channels_last, made tap by tap: each tap
    of a channels_last weight is a dense (O,C) slice, where indexing the whole kernel is slow."""
    taps = torch.empty(weight.shape[0], weight.shape[1], len(rows), len(cols), dtype=weight.dtype,
                       device=weight.device, memory_format=torch.channels_last)
    scale = scale.to(weight.dtype)
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            torch.mul(weight[:, :, row, col], scale, out=taps[:, :, i, j])
    return taps


class NoiseInjection(nn.Module):
    """GPEN's 'isconcat' noise: the encoder feature, scaled, is concatenated as extra channels."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return torch.cat((image, noise * self.weight.to(noise.dtype)), dim=1)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channel: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)


class StyledConv(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, 3, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel * 2)

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor], style: torch.Tensor,
                noise: torch.Tensor, space: Workspace | None = None, names: tuple[str, str] = ("", "")):
        """cat(conv(x), noise) activated. On the workspace path the two halves are never joined:
        they are returned as a pair of maps, written into the blocks `names`, and x may be a pair."""
        if space is None:
            return self.activate(self.noise(self.conv(x, style), noise))
        channels, bias = noise.shape[1], self.activate.bias
        convolved = fill_bias_(space.take(names[0], noise.shape, noise), bias[:channels])
        self.conv(x, style, convolved, space)
        scaled = fill_bias_(space.take(names[1], noise.shape, noise), bias[channels:])
        scaled.add_(noise, alpha=float(self.noise.weight))
        return leaky_relu_gain_(convolved), leaky_relu_gain_(scaled)


class Upsample(nn.Module):
    """upfirdn2d(up=2) with the blur kernel, as a depthwise transposed convolution."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", make_blur_kernel(gain=4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        weight = self.kernel.to(x.dtype)[None, None].expand(channels, 1, *self.kernel.shape)
        return F.conv_transpose2d(x, weight, stride=2, padding=1, groups=channels)


class ToRGB(nn.Module):
    def __init__(self, in_channel: int, style_dim: int, upsample: bool = True):
        super().__init__()
        if upsample:
            self.upsample = Upsample()
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor], style: torch.Tensor,
                skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, style)
        out = out + self.bias.to(out.dtype)
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class ConstantInput(nn.Module):
    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))


class Generator(nn.Module):
    """The StyleGAN2 decoder with concatenated noise; its noise inputs are the encoder's features."""

    def __init__(self, size: int, style_dim: int, n_mlp: int, channels: dict[int, int], lr_mlp: float = 0.01):
        super().__init__()
        self.style = nn.Sequential(PixelNorm(), *(
            EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation=True) for _ in range(n_mlp)))
        self.input = ConstantInput(channels[4])
        self.conv1 = StyledConv(channels[4], channels[4], style_dim)
        self.to_rgb1 = ToRGB(channels[4] * 2, style_dim, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        in_channel = channels[4]
        for res in (2 ** i for i in range(3, int(math.log2(size)) + 1)):
            out_channel = channels[res]
            self.convs.append(StyledConv(in_channel * 2, out_channel, style_dim, upsample=True))
            self.convs.append(StyledConv(out_channel * 2, out_channel, style_dim))
            self.to_rgbs.append(ToRGB(out_channel * 2, style_dim))
            in_channel = out_channel

    def forward(self, latent: torch.Tensor, features: list[torch.Tensor], space: Workspace | None = None) -> torch.Tensor:
        """latent: (B, style_dim) from the encoder; features: encoder outputs from 4x4 upwards.
        With `space`, layers write into three pairs of its blocks in turn (input, two outputs)."""
        w = self.style(latent)
        x = self.input.input.to(features[0].dtype).expand(latent.shape[0], -1, -1, -1)
        x = self.conv1(x, w, features[0])
        skip = self.to_rgb1(x, w)
        holding = None  # the blocks x is in
        stages = list(zip(self.convs[::2], self.convs[1::2], self.to_rgbs, features[1:]))
        for conv_up, conv, to_rgb, feature in stages:
            if space is not None:
                first, second = [name for name in "abc" if name != holding][:2]
                x = conv_up(x, w, feature, space, (first + "0", first + "1"))
                # The last layer's noise half goes into block 't', free once the upsampling is done:
                # the largest maps are then held once fewer.
                last = feature is stages[-1][3]
                x = conv(x, w, feature, space, (second + "0", "t" if last else second + "1"))
                holding = second
            else:
                x = conv(conv_up(x, w, feature), w, feature)
            skip = to_rgb(x, w, skip)
        return skip


class EqualConv2d(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, kernel_size: int):
        super().__init__()
        self.weight = conv_weight(out_channel, in_channel, kernel_size, kernel_size)
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)


class EncoderLayer(nn.Sequential):
    """The reference ConvLayer: [blur,] equalised conv (stride 2 after the blur), biased activation."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, downsample: bool):
        layers: list[nn.Module] = []
        if downsample:
            # Blur with padding 2 (h -> h+1), then a 3x3 stride-2 conv without padding (-> h/2).
            layers.append(Blur(pad=2))
        layers += [EqualConv2d(in_channel, out_channel, kernel_size), FusedLeakyReLU(out_channel)]
        super().__init__(*layers)
        self.downsample = downsample
        self.padding = 0 if downsample else kernel_size // 2

    def forward(self, x: torch.Tensor, space: Workspace | None = None, name: str = "") -> torch.Tensor:
        """With `space`, the layer writes its output into the block `name` (and blurs in block
        't', which the decoder's transposed convolutions use once the encoder is done)."""
        *pre, conv, act = self
        weight = (conv.weight * conv.scale).to(x.dtype)
        stride = 2 if self.downsample else 1
        batch, channels, height, width = x.shape
        shape = (batch, weight.shape[0], height // stride, width // stride)
        if space is None:
            for layer in pre:
                x = layer(x)
            return act(F.conv2d(x, weight, stride=stride, padding=self.padding))
        for blur_layer in pre:
            blurred = space.take("t", (batch, channels, height + 1, width + 1), x).zero_()
            x = conv_into(blurred, x, blur_weight(blur_layer.kernel, x), (blur_layer.pad, blur_layer.pad),
                          groups=channels)
        out = fill_bias_(space.take(name, shape, x), act.bias)
        return leaky_relu_gain_(conv_into(out, x, weight, (self.padding, self.padding), stride))


def dense_state_dict(module: nn.Module, state: dict, prefix: str, metadata) -> None:
    """state_dict() hook: weights in the checkpoints' own dense layout whatever their layout in memory
    (conv_weight), so that they save anywhere (safetensors refuses strided tensors)."""
    for key, value in state.items():
        if key.startswith(prefix) and not value.is_contiguous():
            state[key] = value.contiguous()


class GPEN(nn.Module):
    """The reference FullGenerator: a U-shaped encoder whose features drive a StyleGAN2 decoder.

    `model(x)` takes NCHW RGB in [-1, 1] and returns the restored face in the same layout and range.
    """

    def __init__(self, size: int = 512, style_dim: int = 512, n_mlp: int = 8,
                 channel_multiplier: float = 2, narrow: float = 1.0):
        super().__init__()
        if size < 8 or size & (size - 1):
            raise ValueError(f"GPEN size must be a power of two from 8 up, got {size}")
        self.size, self.style_dim, self.n_mlp = size, style_dim, n_mlp
        self.channel_multiplier, self.narrow = channel_multiplier, narrow
        channels = channel_widths(channel_multiplier, narrow)
        log_size = int(math.log2(size))
        self.generator = Generator(size, style_dim, n_mlp, channels)
        self.ecd0 = nn.Sequential(EncoderLayer(3, channels[size], 1, downsample=False))
        for i in range(1, log_size - 1):
            res = size >> i
            setattr(self, f"ecd{i}", nn.Sequential(EncoderLayer(channels[res * 2], channels[res], 3, downsample=True)))
        self.final_linear = nn.Sequential(EqualLinear(channels[4] * 16, style_dim, activation=True))
        self.n_encoders = log_size - 1
        self.info = None  # an archs.spec.ModelInfo once loaded from a file
        self.register_state_dict_post_hook(dense_state_dict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = cpu_fast.usable(self, x)  # on the CPU, not recording autograd nor tracing
        if x.shape[0] > 1 and fast:
            # At batch 1 styles fold into the weights (plain dense convolutions); on the CPU that beats
            # modulating a batch's activations, so a batch goes one face at a time. A trace (ONNX
            # export) keeps the batched layers, so that it takes any batch size.
            return torch.cat([self(face[None]) for face in x])
        x = x.to(self.ecd0[0][0].weight.dtype).contiguous(memory_format=torch.channels_last)
        space = workspace.workspace(self) if fast else None
        features = []
        for i in range(self.n_encoders):
            x = getattr(self, f"ecd{i}")[0](x, space, f"e{i}")
            features.append(x)
        latent = self.final_linear(x.reshape(x.shape[0], -1))
        return self.generator(latent, features[::-1], space).contiguous()

    def release_workspace(self) -> None:
        """Free the memory this thread's CPU forward passes keep for the large feature maps (about
        the size of the largest few: ~0.6 GB at GPEN-512); the next pass makes it again."""
        workspace.release(self)
