"""Reading weight files safely: tensors only, and an error that names the file for anything else."""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

# Keys by which other face networks users keep beside GPEN give themselves away.
OTHER_NETWORKS = {
    "RetinaFace face-detector": ("ClassHead.", "BboxHead.", "LandmarkHead.", "body.stage1", "fpn.output1"),
    "GFPGAN": ("conv_body_first.", "stylegan_decoder.", "toRGB.0."),
    "CodeFormer": ("quantize.embedding.", "fuse_convs_dict.", "ft_layers."),
    "RestoreFormer": ("vqvae.",),
    "Real-ESRGAN/ESRGAN": ("conv_first.", "RRDB_trunk.", "body.0.rdb1."),
    "Stable Diffusion": ("model.diffusion_model.",),
}
WRAPPER_KEYS = ("g_ema", "params_ema", "params", "state_dict", "model")


@dataclass(frozen=True)
class ModelInfo:
    """What a weight file holds."""

    kind: str  # "GPEN"
    format: str  # "pth", "safetensors" or "onnx"
    size: int
    channel_multiplier: float | None = None  # None where the file does not say (ONNX)
    narrow: float | None = None
    style_dim: int | None = None
    n_mlp: int | None = None
    parameters: int | None = None
    dtype: str = "float32"  # as stored in the file

    def __str__(self) -> str:
        parts = [f"{self.kind}-{self.size} ({self.format}, {self.dtype})"]
        if self.channel_multiplier is not None:
            parts.append(f"channel_multiplier {self.channel_multiplier:g}, narrow {self.narrow:g}, "
                         f"{self.parameters / 1e6:.1f}M parameters")
        return ", ".join(parts)


class CheckpointError(ValueError):
    """A weight file that cannot be used, with a message that names it and says what was found."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt/.safetensors file, unwrapped from training dicts and DataParallel."""
    path = Path(path)
    check_file(path)
    if path.suffix.lower() == ".safetensors":
        state = _read_safetensors(path)
    else:
        state = _read_pickle(path)
    return unwrap_state_dict(state, path)


def unwrap_state_dict(state: object, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    while isinstance(state, dict):
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not state:
        raise CheckpointError(path, f"holds {type(state).__name__}, not a state dict of tensors")
    tensors = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(path, "holds no tensors")
    return tensors


def describe_other_network(state: dict[str, torch.Tensor]) -> str | None:
    """The name of a known non-GPEN network whose keys these are, if any."""
    for name, markers in OTHER_NETWORKS.items():
        if any(key.startswith(markers) for key in state):
            return name
    return None


def check_file(path: Path) -> None:
    """Fail early, naming the file, on what is plainly not a weight file."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(path, "is a folder, not a weight file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(path, "is empty (0 bytes); the download probably failed, fetch it again")
    with open(path, "rb") as f:
        head = f.read(256)
    if _looks_like_text(head):
        start = head.decode("utf-8", "replace").strip().splitlines()[0][:60]
        hint = " (a Git LFS pointer: the real file was never downloaded)" if head.startswith(b"version https://git-lfs") else ""
        raise CheckpointError(path, f"is a text file, not weights{hint}; it starts with {start!r}")


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def _read_pickle(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                path, "contains pickled Python objects besides tensors (possibly code); refusing to unpickle it. "
                "Convert it where you trust it: python -m gpen convert FILE OUT.safetensors") from None
        raise CheckpointError(path, f"is corrupt or not a PyTorch file ({e})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(path, f"is truncated or corrupt, fetch it again ({first_line(e)})") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(path, f"is truncated or corrupt safetensors, fetch it again ({e})") from None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries append pages of context), or its type."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
