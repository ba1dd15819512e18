"""Restorers: what the pipeline asks of one (`Restorer`), the handle that runs a network on face crops
(`RestorerHandle`: normalisation, resizing, batching, device, dtype, cancel, OOM back-off, the finite
check and the float32 re-run of faces half precision broke), `as_restorer`, which makes a restorer of
whatever the caller gave, and `IdentityRestorer`, which stands in for a network."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from itertools import chain
from typing import Callable, Protocol, runtime_checkable

import torch

from ..archs import SPECS
from ..archs.spec import Convention, network_input, resize
from .align import TEMPLATE_POINTS
from .handle import NetworkHandle
from .tensors import as_rgb, match_channels

Forward = Callable[[torch.Tensor], torch.Tensor]
CANCEL_CHECK_SECONDS = 0.5  # on the CPU, how often a running forward asks the caller whether to go on
log = logging.getLogger("gpen")


@runtime_checkable
class Restorer(Protocol):
    """Restores aligned face crops: (B,S,S,3) RGB float in 0..1 -> the same. A face whose output is not
    finite comes back as NaN; `cancel()` raises to stop, also in the middle of a batch; `on_rerun(n)` hears
    of faces run again in float32 (see RestorerHandle.restore)."""

    size: int

    def restore(self, faces: torch.Tensor, batch_size: int = 4, on_batch: Callable[[int, int], None] | None = None,
                cancel: Callable[[], None] | None = None,
                on_rerun: Callable[[int], None] | None = None) -> torch.Tensor: ...


class RestorerHandle(NetworkHandle):
    """A restoring network (a torch module or an ONNX runner) with its spec, ready for face crops."""

    def __init__(self, network, spec):
        super().__init__(network, spec)
        if self.template is not None and self.template not in TEMPLATE_POINTS:
            raise ValueError(f"{spec.name}: template {self.template!r} is not one of {', '.join(TEMPLATE_POINTS)}")

    @property
    def template(self) -> str | None:
        """The face alignment the network was trained on (faces/align.py), where its spec says."""
        return self.spec.convention.template

    def restore(self, faces: torch.Tensor, batch_size: int = 4, on_batch: Callable[[int, int], None] | None = None,
                cancel: Callable[[], None] | None = None,
                on_rerun: Callable[[int], None] | None = None) -> torch.Tensor:
        """Restore aligned face crops, (B,S,S,3) float 0..1 -> the same; see restore_crops. A network
        whose convention is "one-on-cpu" (GPEN's) takes faces one at a time there, whatever `batch_size`.

        A torch network in float16 or bfloat16 whose output for a face is not finite (GPEN's modulated
        convolutions can pass fp16's 65504) runs that face again with its weights in float32, and
        `on_rerun(count)` is told how many faces were; a face not finite in float32 either (or out of
        memory there even one at a time) stays NaN. ONNX runners keep their file's dtype and re-run nothing."""
        device = self.device
        if self.spec.convention.batch == "one-on-cpu" and device.type == "cpu":
            batch_size = 1

        def run(crops: torch.Tensor, dtype: torch.dtype, on_batch) -> torch.Tensor:
            return restore_crops(lambda x: self.spec.forward(self.network, x), self.size, crops,
                                 convention=self.spec.convention, device=device, dtype=dtype,
                                 batch_size=batch_size, on_batch=on_batch)

        with interruptible(self.network, cancel):
            restored = run(faces, self.dtype, on_batch)
            broken = (~finite_faces(restored)).nonzero().flatten()
            if not len(broken) or not self.is_torch or self.dtype == torch.float32:
                return restored
            try:
                with in_float32(self.network):
                    asked = cancel and (lambda done, total: cancel())  # progress has counted these faces already
                    restored[broken] = run(faces[broken], torch.float32, asked)
            except RuntimeError as e:  # float32 weights and activations take twice the memory
                if not out_of_memory(e):
                    raise
                _empty_cache(device)
                log.warning("%d face(s) not re-run in fp32, out of memory: left unrestored", len(broken))
                return restored
        log.info("%s", rerun_note(len(broken)))
        if on_rerun is not None:
            on_rerun(len(broken))
        return restored

    def __repr__(self) -> str:
        return f"<{self.info or self.spec.name} restorer on {self.device}>"


class CallerRestorer:
    """A caller's own restorer, with `.size` and `restore(faces, batch_size, on_batch)`: asked between
    batches (through `on_batch`) whether to cancel, as it takes no `cancel`."""

    def __init__(self, restorer):
        self.restorer, self.size = restorer, restorer.size

    def restore(self, faces: torch.Tensor, batch_size: int = 4, on_batch: Callable[[int, int], None] | None = None,
                cancel: Callable[[], None] | None = None,
                on_rerun: Callable[[int], None] | None = None) -> torch.Tensor:
        restored = self.restorer.restore(faces, batch_size=batch_size, on_batch=on_batch)  # it re-runs nothing of ours
        shape = tuple(getattr(restored, "shape", ()))
        if len(shape) != 4 or shape[0] != len(faces) or shape[1] != shape[2]:
            raise ValueError(f"the restorer gave {shape} for {len(faces)} faces: it must give one square crop "
                             "(N, S, S, C) a face")
        return restored


class IdentityRestorer:
    """A restorer that hands the crops back unchanged, as new tensors (a network makes new ones): what
    benchmarks, pictures and tests put in GPEN's place to measure, show or check the pipeline around it.
    `batches` holds the size of each batch it was given."""

    def __init__(self, size: int = 512):
        self.size = size
        self.batches: list[int] = []

    def restore(self, faces: torch.Tensor, batch_size: int = 4,
                on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
        for start in range(0, len(faces), batch_size):
            self.batches.append(len(faces[start:start + batch_size]))
            if on_batch is not None:
                on_batch(min(start + batch_size, len(faces)), len(faces))
        return faces.clone()


def as_restorer(model) -> Restorer:
    """A restorer from what a caller gives: a handle (from load_model) as it is, a bare network of a
    registered architecture (a `GPEN` module) in a handle, any other object with `.size` and
    `restore(faces, batch_size, on_batch)` as a caller's restorer."""
    if isinstance(model, (RestorerHandle, CallerRestorer)):
        return model
    if isinstance(model, torch.nn.Module):
        spec = next((s for s in SPECS if s.role == "restorer" and type(model) is s.build), None)
        if spec is None:
            raise TypeError(f"{type(model).__name__} is no restorer registered in gpen.archs (see register)")
        return RestorerHandle(model, spec)
    if not hasattr(model, "restore") or not hasattr(model, "size"):
        raise TypeError(f"a restorer needs .size and .restore(faces, batch_size, on_batch); got {type(model).__name__}")
    return CallerRestorer(model)


def restore_crops(forward: Forward, size: int, faces: torch.Tensor, *, convention: Convention = Convention(),
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 4,
                  on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Restore aligned crops (B,S,S,3 float 0..1) and return them in the same layout and size.

    `forward` maps what a network of `convention` takes (by default NCHW RGB in [-1, 1]) at `size` to
    the same. Crops of another size are resized to the model's and back. `on_batch(done, total)` is
    called after each batch; it may raise to cancel.
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
                y = forward(network_input(resize(x.clamp(0, 1), (size, size)), convention).to(dtype)).float()
            except RuntimeError as e:
                if batch_size == 1 or not out_of_memory(e):
                    raise
                batch_size //= 2  # out of memory: retry this batch in halves
                _empty_cache(device)
                continue
            y = image_output(y, convention)
            y = resize(y, (height, width)).clamp(0, 1)
            out[start:start + len(y)] = y.permute(0, 2, 3, 1).to(out.device)
            start += len(y)
            if on_batch is not None:
                on_batch(start, total)
    return out


# What a GPU out of memory raises besides torch's allocator's OutOfMemoryError: cuBLAS and cuDNN allocate
# their handles and workspaces outside that allocator, and a CUDA call that fails there is a RuntimeError.
OUT_OF_MEMORY = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                 "HIPBLAS_STATUS_ALLOC_FAILED", "MIOPEN_STATUS_ALLOC_FAILED")


def out_of_memory(error: RuntimeError) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or any(text in str(error) for text in OUT_OF_MEMORY)


def image_output(y: torch.Tensor, convention: Convention) -> torch.Tensor:
    """A restorer's output -> NCHW RGB in 0..1, faces that are not finite marked NaN throughout."""
    if convention.layout == "nhwc":
        y = y.permute(0, 3, 1, 2)
    y[~finite_faces(y)] = float("nan")  # clamping would hide an Inf (fp16 overflow): mark the face
    y = (y.clamp(-1, 1) + 1) / 2 if convention.input == "-1..1" else y.clamp(0, 1)
    return y.flip(1) if convention.colour == "bgr" else y


def restore_aligned(model, crops: torch.Tensor, strength: float = 1.0, batch_size: int = 4,
                    on_batch: Callable[[int, int], None] | None = None,
                    cancel: Callable[[], None] | None = None, notes: list[str] | None = None) -> torch.Tensor:
    """Aligned crops (N,S,S,C) restored by `model`, blended with the input by `strength` (GPEN's alpha),
    in the input's channels. `notes`, when given, gets what a summary should say: faces re-run in float32,
    faces left as they were (not finite even so)."""
    check_strength(strength)
    rgb = as_rgb(crops)
    said = notes if notes is not None else []
    restored = as_restorer(model).restore(rgb, batch_size=batch_size, on_batch=on_batch, cancel=cancel,
                                          on_rerun=lambda count: said.append(rerun_note(count))).to(rgb)
    broken = ~finite_faces(restored)
    if broken.any():
        said.append(unrestored_note(int(broken.sum())))
        log.warning("%s", said[-1])
        restored[broken] = rgb[broken]
    return match_channels(torch.lerp(rgb, restored, strength), crops)


def finite_faces(faces: torch.Tensor) -> torch.Tensor:
    """(N,) True where a face holds no NaN or Inf; a per-face sum spots either without copying the faces."""
    return faces.sum(dim=tuple(range(1, faces.ndim)), dtype=torch.float32).isfinite()


def rerun_note(count: int) -> str:
    """What summaries say of faces re-run in float32 (RestorerHandle.restore)."""
    return f"{count} face(s) re-run in fp32: half precision (fp16/bf16) overflowed"


def unrestored_note(count: int) -> str:
    """What summaries and logs say of faces left as they were because the restorer's output was not finite."""
    return f"{count} face(s) left unrestored: the restorer's output was not finite (NaN or Inf)"


@contextmanager
def in_float32(network: torch.nn.Module):
    """The network's floating-point weights and buffers in float32 for a while, then each back in its own
    dtype: exact both ways (every float16 and bfloat16 is a float32), with no second copy of the weights
    kept. The network is changed in place, so nothing else may run it meanwhile."""
    tensors = [t for t in chain(network.parameters(), network.buffers()) if t.is_floating_point()]
    dtypes = [t.dtype for t in tensors]
    try:  # also when memory runs out half way through
        for t in tensors:
            t.data = t.data.float()
        yield
    finally:
        for t, dtype in zip(tensors, dtypes):
            t.data = t.data.to(dtype)


def check_strength(strength: float) -> None:
    if not 0 <= strength <= 1:  # also refuses NaN
        raise ValueError(f"strength must be between 0 and 1, got {strength}")


@contextmanager
def interruptible(network, cancel: Callable[[], None] | None):
    """While a torch network runs on the CPU (seconds a face), ask `cancel` between its layers, at most
    every CANCEL_CHECK_SECONDS, so that a cancel is seen mid-batch."""
    if cancel is None or not isinstance(network, torch.nn.Module) or next(network.parameters()).device.type != "cpu":
        yield
        return
    last = time.monotonic()

    def between_layers(module, args) -> None:
        nonlocal last
        if time.monotonic() - last >= CANCEL_CHECK_SECONDS:
            last = time.monotonic()
            cancel()

    handles = [m.register_forward_pre_hook(between_layers) for m in network.modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _empty_cache(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
