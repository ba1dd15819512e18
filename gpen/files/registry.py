"""The networks ComfyUI-GPEN runs, as a registry in the spirit of spandrel: each architecture says how
to recognise its state dict by keys, reads its configuration from tensor shapes, and builds itself.

Loading goes through one path for every kind: recognise, read the configuration (bounded), build on
the meta device and compare key for key and shape for shape, refuse non-finite weights, and only
then allocate and copy. A hostile file costs nothing; a new network (CodeFormer, another parser) is
one more `Architecture` in `ARCHITECTURES`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .weights import CheckpointError, ModelInfo, check_finite, check_layout, describe_other_network, first_line

ROLES = ("restorer", "detector", "parser")


@dataclass(frozen=True)
class Architecture:
    name: str  # what ModelInfo.kind says, e.g. "GPEN", "RetinaFace face-detector"
    role: str  # "restorer", "detector" or "parser"
    matches: Callable[[dict], bool]  # by keys alone
    config: Callable[[dict], dict]  # constructor arguments from tensor shapes; ValueError when out of bounds
    make: Callable[..., nn.Module]  # the network from its configuration
    details: Callable[[nn.Module], dict] = lambda net: {}  # ModelInfo fields besides kind and parameters


def _gpen() -> Architecture:
    from ..archs.gpen import GPEN_KEYS, check_gpen_config, infer_gpen_config
    from ..archs.gpen.network import GPEN

    def config(state):
        config = infer_gpen_config(state)
        check_gpen_config(config)
        return config

    return Architecture("GPEN", "restorer", lambda state: all(k in state for k in GPEN_KEYS), config, GPEN,
                        lambda net: {k: getattr(net, k) for k in ("size", "channel_multiplier", "narrow",
                                                                  "style_dim", "n_mlp")})


def _retinaface() -> Architecture:
    from ..archs.retinaface import RetinaFace

    return Architecture("RetinaFace face-detector", "detector", lambda state: RetinaFace.backbone_of(state) is not None,
                        lambda state: {"backbone": RetinaFace.backbone_of(state)}, RetinaFace,
                        lambda net: {"detail": f"{net.backbone} backbone"})


def _parsenet() -> Architecture:
    from ..archs.parsenet import ParseNet, is_parsenet, parsenet_config

    return Architecture("ParseNet face-parser", "parser", is_parsenet, parsenet_config, ParseNet,
                        lambda net: {"size": net.in_size})


def _bisenet() -> Architecture:
    from ..archs.bisenet import BiSeNet, bisenet_config, is_bisenet

    return Architecture("BiSeNet face-parser", "parser", is_bisenet, bisenet_config, BiSeNet,
                        lambda net: {"detail": f"{net.num_class} classes"})


ARCHITECTURES = (_gpen, _retinaface, _parsenet, _bisenet)  # made on first use: each imports its module


def identify(state: dict[str, torch.Tensor], path: str | os.PathLike, role: str | None = None) -> Architecture:
    """The architecture these weights are for (of `role`, when given), or a CheckpointError naming
    what they are instead."""
    for make in ARCHITECTURES:
        arch = make()
        if arch.matches(state):
            if role is not None and arch.role != role:
                raise CheckpointError(path, f"holds {arch.name} weights, not a {role}")
            return arch
    other = describe_other_network(state)
    if other is not None:
        raise CheckpointError(path, f"holds {other} weights" + (f", not a {role}" if role else ""))
    raise CheckpointError(path, "is not a network ComfyUI-GPEN knows (GPEN, RetinaFace, SCRFD, ParseNet, BiSeNet, "
                          f"GFPGAN, CodeFormer, ...); it starts with {', '.join(list(state)[:3])}")


def skeleton(state: dict[str, torch.Tensor], path: str | os.PathLike,
             role: str | None = None) -> tuple[Architecture, nn.Module]:
    """The network these weights are for, on the meta device (no memory), checked key for key and
    shape for shape against them, with finite weights."""
    arch = identify(state, path, role)
    try:
        config = arch.config(state)
    except CheckpointError as e:  # a configuration reader that names its own problem
        raise CheckpointError(path, e.problem) from None
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(path, f"has {arch.name} keys but does not fit its layout ({first_line(e)})") from None
    with torch.device("meta"):
        net = arch.make(**config)
    check_layout(state, net, path, arch.name)
    check_finite(state, path)
    return arch, net


def build(state: dict[str, torch.Tensor], path: str | os.PathLike, role: str | None = None) -> nn.Module:
    """The network holding these weights, in float32 and eval mode, on the CPU, after `skeleton`'s
    checks; its `.info` says what it is."""
    arch, net = skeleton(state, path, role)
    # Allocated, not initialised: every parameter and buffer is in the state dict, and the strict copy
    # fills them all (widening float16 and bfloat16 to float32).
    net = net.to_empty(device="cpu")
    net.load_state_dict(state, strict=True)
    check_finite(net.state_dict(), path)  # float64 that overflows float32 shows only after the copy
    net.info = info(arch, net, state, path)
    return net.eval().requires_grad_(False)


def describe(state: dict[str, torch.Tensor], path: str | os.PathLike) -> ModelInfo:
    """What these weights are, checked as far as their architecture is known, without building them."""
    try:
        arch, net = skeleton(state, path)
    except CheckpointError:
        other = describe_other_network(state)
        if other is None or any(make().matches(state) for make in ARCHITECTURES):
            raise
        return ModelInfo(kind=other, format=weight_format(path), dtype=stored_dtype(state),
                         parameters=sum(t.numel() for t in state.values() if t.is_floating_point()))
    return info(arch, net, state, path)


def info(arch: Architecture, net: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> ModelInfo:
    """The descriptor of a network of `arch` holding `state`, read from file `path`."""
    return ModelInfo(kind=arch.name, format=weight_format(path), dtype=stored_dtype(state),
                     parameters=sum(p.numel() for p in net.parameters()), **arch.details(net))


def weight_format(path: str | os.PathLike) -> str:
    return "safetensors" if Path(path).suffix.lower() == ".safetensors" else "pth"


def stored_dtype(state: dict[str, torch.Tensor]) -> str:
    return str(next(iter(state.values())).dtype).removeprefix("torch.")
