"""Reading weight files safely: tensors only, and an error that names the file for anything else."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import torch

from .atomic import atomic_file

# Keys by which other face networks users keep beside GPEN give themselves away.
OTHER_NETWORKS = {
    "RetinaFace face-detector": ("ClassHead.", "BboxHead.", "LandmarkHead.", "body.stage1", "fpn.output1"),
    "GFPGAN": ("conv_body_first.", "stylegan_decoder.", "toRGB.0."),
    "CodeFormer": ("quantize.embedding.", "fuse_convs_dict.", "ft_layers."),
    "RestoreFormer": ("vqvae.",),
    "Real-ESRGAN/ESRGAN": ("conv_first.", "RRDB_trunk.", "body.0.rdb1."),
    "Stable Diffusion": ("model.diffusion_model.",),
    "ParseNet face-parser": ("out_mask_conv.", "out_img_conv."),
    "BiSeNet face-parser": ("cp.resnet.", "conv_out16."),
}
WRAPPER_KEYS = ("g_ema", "params_ema", "params", "state_dict", "model")
# A GPEN checkpoint's pickle record is about 20 KB, and the weights-only unpickler reads about 2 MB/s
# and cannot be interrupted: a bigger record is a decompression bomb, not weights.
PICKLE_RECORD_LIMIT = 16 * 2**20
# torch.save stores its zip records uncompressed, so together they are never much bigger than the file.
EXPANSION_LIMIT = 10
# The largest real layouts hold 702 tensors (RRDBNet x4plus) in a 75 KB safetensors header; the
# library reads a header of up to 100 MB and makes every tensor it lists, a minute and gigabytes for a
# million of them, before any check of ours could run.
MAX_TENSORS = 20_000
MAX_SAFETENSORS_HEADER = 8 << 20
TRUST_HINT = ("If you trust where it came from, keep only its tensors with "
              "python -m gpen convert FILE OUT.safetensors --trust (this runs the file's code) and load OUT.safetensors")


class CheckpointError(ValueError):
    """A weight file that cannot be used, with a message that names it and says what was found."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


def read_state_dict(path: str | os.PathLike, trust: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt/.safetensors file, unwrapped from training dicts and DataParallel.

    Pickles are read weights-only: anything but tensors and plain containers is refused. `trust=True`
    unpickles everything, running whatever code the file holds, and keeps only the tensors: only
    for an explicit opt-in by the user (convert --trust).
    """
    path = Path(path)
    check_file(path)
    if path.suffix.lower() == ".safetensors":
        state = _read_safetensors(path)
    else:
        state = _read_pickle(path, trust)
    tensors = unwrap_state_dict(state, path)
    check_storage(tensors, path)
    return tensors


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


def check_storage(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse tensors that claim more elements than their data holds (zero-stride or overlapping views).

    No saved network has them, and a 2 KB file of such views can claim gigabytes: copying one would
    fill memory. After this check the weights are no bigger than the file's data.
    """
    for key, t in tensors.items():
        claimed = t.numel() * t.element_size()
        if claimed > t.untyped_storage().nbytes():
            raise CheckpointError(path, f"{key} claims shape {tuple(t.shape)} ({claimed:,} bytes) but its data holds "
                                  f"{t.untyped_storage().nbytes():,} bytes; the file is crafted or broken")


def check_layout(state: dict[str, torch.Tensor], reference: torch.nn.Module, path: str | os.PathLike,
                 layout: str) -> None:
    """Refuse weights that do not fit `reference` (usually built on the meta device) key for key and
    shape for shape, before anything their size is allocated."""
    expected = reference.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and (state[k].shape != expected[k].shape or
                                                    state[k].is_floating_point() != expected[k].is_floating_point())]
    problems = []
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    if wrong:
        k = wrong[0]
        problems.append(f"{k} is {_describe_tensor(state[k])} where the layout has {_describe_tensor(expected[k])}"
                        + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    if problems:
        raise CheckpointError(path, f"does not fit the {layout} layout: {'; '.join(problems)}")


def check_finite(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse NaN or infinite weights: they would turn every output into NaN, black or noise."""
    for key, t in tensors.items():
        # NaN and infinity survive a sum, which is one pass and allocates nothing; only a sum that is
        # not finite (huge finite weights could overflow it too) pays for the exact test.
        if t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            raise CheckpointError(path, f"{key} holds NaN or infinite values; the file is damaged "
                                  "(or was saved from a training run that diverged)")


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _describe_tensor(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


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


def _read_pickle(path: Path, trust: bool) -> object:
    # Zip checkpoints are memory-mapped: torch then refuses records that are compressed or smaller
    # than their tensors claim. Legacy (non-zip) pickles hold their pickle and data uncompressed, so
    # what they cost is bounded by the file's size: torch reserves a storage's claimed size but only
    # touches what it reads from the file.
    zipped = zipfile.is_zipfile(path)
    if zipped:
        check_zip_records(path)
    try:
        if trust:  # the user's explicit opt-in (convert --trust): this unpickles anything, running its code
            return torch.load(path, map_location="cpu", weights_only=False, mmap=zipped)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                path, "contains pickled Python objects besides tensors (possibly code); refusing to unpickle it. "
                + TRUST_HINT) from None
        raise CheckpointError(path, f"is corrupt or not a PyTorch file ({first_line(e)})") from None
    except (ImportError, AttributeError) as e:  # only with trust: the file names code that is not here
        raise CheckpointError(path, f"needs Python code that is not installed here to unpickle ({first_line(e)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(path, f"is truncated or corrupt, fetch it again ({first_line(e)})") from None


def check_zip_records(path: Path) -> None:
    """Refuse a zip checkpoint whose records would expand far beyond the file, before reading any."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(path, f"is truncated or corrupt, fetch it again ({first_line(e)})") from None
    pickle_size = sum(r.file_size for r in records if r.filename.rpartition("/")[2] == "data.pkl")
    if pickle_size > PICKLE_RECORD_LIMIT:
        raise CheckpointError(path, f"has a pickle record of {pickle_size / 2**20:,.0f} MB (a GPEN checkpoint's is "
                              f"about 20 KB, the limit is {PICKLE_RECORD_LIMIT // 2**20} MB); refusing to unpickle it")
    expanded, size = sum(r.file_size for r in records), path.stat().st_size
    if expanded > EXPANSION_LIMIT * size:
        raise CheckpointError(path, f"has records that expand to {expanded / 2**20:,.0f} MB from a {size / 2**20:.2f} MB "
                              "file (torch.save never compresses them); refusing to read it")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    safetensors_header(path)
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(path, f"is truncated or corrupt safetensors, fetch it again ({e})") from None


def safetensors_header(path: Path) -> tuple[int, dict]:
    """The length and JSON of a safetensors header (an 8-byte little-endian length, then JSON), refused
    by its size and its count of tensors before it is parsed, and by name when it cannot be read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or length > size - 8:
            raise CheckpointError(path, f"is cut short: {size} bytes, less than its safetensors header")
        if length > MAX_SAFETENSORS_HEADER:
            raise CheckpointError(path, f"has a safetensors header of {length / 2**20:,.1f} MB (real networks' "
                                  f"headers take under 0.1 MB, the limit is {MAX_SAFETENSORS_HEADER >> 20} MB)")
        text = f.read(length)
    listed = text.count(b'"data_offsets"')  # one per tensor, counted before anything is built for them
    if listed > MAX_TENSORS:
        raise CheckpointError(path, f"lists {listed:,} tensors (real networks have a few hundred, the limit is "
                              f"{MAX_TENSORS:,})")
    try:
        header = json.loads(text)
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(path, "has no readable safetensors header")
    return length, header


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> None:
    """Write `path` whole or not at all (a temporary file beside it, then a rename), readable like
    any new file: 0666 less the umask, where safetensors alone leaves 0600."""
    from safetensors.torch import save_file

    with atomic_file(path, suffix=".tmp") as temporary:
        save_file(tensors, temporary, metadata=metadata)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries append pages of context), or its type."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
