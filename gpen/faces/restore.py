"""Running a restorer on ComfyUI-layout face crops: normalisation, resizing, batching, device, dtype."""

from __future__ import annotations

import inspect
import logging
import time
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F

Forward = Callable[[torch.Tensor], torch.Tensor]
CANCEL_CHECK_SECONDS = 0.5  # on the CPU, how often a running forward asks the caller whether to go on


def restore_crops(forward: Forward, size: int, faces: torch.Tensor, *, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, batch_size: int = 4,
                  on_batch: Callable[[int, int], None] | None = None,
                  cancel: Callable[[], None] | None = None) -> torch.Tensor:
    """Restore aligned crops (B,S,S,3 float 0..1) and return them in the same layout and size.

    `forward` maps NCHW RGB in [-1, 1] at `size` to the same. Crops of another size are resized to
    the model's and back. `on_batch(done, total)` is called after each batch; it may raise to cancel.
    `cancel()`, which raises to cancel, is also asked on the CPU between a torch model's layers every
    CANCEL_CHECK_SECONDS, since one face there takes seconds.
    A batch that runs out of GPU memory is retried in halves, down to one face. A face whose output is
    not finite (NaN weights, an fp16 overflow) comes back as NaN, for the caller to leave unrestored.
    """
    if faces.ndim != 4 or faces.shape[-1] != 3:
        raise ValueError(f"faces must be (B, S, S, 3) RGB crops, got shape {tuple(faces.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    total, height, width = faces.shape[:3]
    out = torch.empty(faces.shape, dtype=torch.float32, device=faces.device)  # results stay where the crops are
    start = 0
    with torch.inference_mode():
        while start < total:
            x = faces[start:start + batch_size].to(device=device, dtype=torch.float32).permute(0, 3, 1, 2)
            try:
                with _interruptible(forward, cancel):
                    y = forward((_resize(x.clamp(0, 1), size, size) * 2 - 1).to(dtype)).float()
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size //= 2  # out of memory: retry this batch in halves
                _empty_cache(device)
                continue
            y[~finite_faces(y)] = float("nan")  # clamping would hide an Inf (fp16 overflow): mark the face
            y = _resize((y.clamp(-1, 1) + 1) / 2, height, width).clamp(0, 1)
            out[start:start + len(y)] = y.permute(0, 2, 3, 1).to(out.device)
            start += len(y)
            if on_batch is not None:
                on_batch(start, total)
    return out


def restore_aligned(model, crops: torch.Tensor, strength: float = 1.0, batch_size: int = 4,
                    on_batch: Callable[[int, int], None] | None = None,
                    cancel: Callable[[], None] | None = None) -> torch.Tensor:
    """Aligned crops (N,S,S,C) restored by `model`, blended with the input by `strength` (GPEN's alpha),
    in the input's channels."""
    from .tensors import as_rgb, match_channels

    check_strength(strength)
    rgb = as_rgb(crops)
    restored = model.restore(rgb, batch_size=batch_size, on_batch=on_batch, **cancel_hook(model, cancel)).to(rgb)
    broken = ~finite_faces(restored)
    if broken.any():
        logging.getLogger("gpen").warning("%d face(s) left unrestored: the restorer's output was not finite "
                                          "(NaN or Inf)", int(broken.sum()))
        restored[broken] = rgb[broken]
    return match_channels(torch.lerp(rgb, restored, strength), crops)


def cancel_hook(model, cancel: Callable[[], None] | None) -> dict:
    """{"cancel": cancel} for restorers whose restore() takes one (GPEN's), else nothing: any object
    with `.size` and `restore(faces, batch_size, on_batch)` is a restorer."""
    if cancel is None or "cancel" not in inspect.signature(model.restore).parameters:
        return {}
    return {"cancel": cancel}


def finite_faces(faces: torch.Tensor) -> torch.Tensor:
    """(N,) True where a face holds no NaN or Inf; a per-face sum spots either without copying the faces."""
    return faces.sum(dim=tuple(range(1, faces.ndim)), dtype=torch.float32).isfinite()


def check_strength(strength: float) -> None:
    if not 0 <= strength <= 1:  # also refuses NaN
        raise ValueError(f"strength must be between 0 and 1, got {strength}")


@contextmanager
def _interruptible(forward: Forward, cancel: Callable[[], None] | None):
    """While a network runs on the CPU (seconds a face), ask `cancel` between its layers, at most every
    CANCEL_CHECK_SECONDS, so that a cancel is seen mid-batch."""
    if cancel is None or not isinstance(forward, torch.nn.Module) or next(forward.parameters()).device.type != "cpu":
        yield
        return
    last = time.monotonic()

    def between_layers(module, args) -> None:
        nonlocal last
        if time.monotonic() - last >= CANCEL_CHECK_SECONDS:
            last = time.monotonic()
            cancel()

    handles = [m.register_forward_pre_hook(between_layers) for m in forward.modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _empty_cache(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if x.shape[-2:] == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
