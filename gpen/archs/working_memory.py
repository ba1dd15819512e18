"""A forward pass's working memory: the most bytes of tensors it holds at once beyond the weights and its
input (its output included), counted rather than measured, for any torch network.

The forward runs on the meta device (shapes and dtypes, no data: a tenth of a second for GPEN-2048) under
a dispatch mode that adds each storage an op makes when it is made and takes it off when the last tensor
on it dies. Views and in-place results share their input's storage and add nothing. On the meta device
networks take the path they take on a GPU (no CPU fast path: cpu_fast.usable), so the count is what a GPU's
forward asks its allocator for, op by op. Not counted: what a kernel takes inside an op (cuDNN's
workspace) and the allocator's rounding, so a GPU's measured peak is a little higher (the acceptance
check compares them). `counted_peak` counts the same on real tensors, which the tests use to show that
the meta count follows the real forward.
"""

from __future__ import annotations

import copy
import logging
import weakref
from itertools import chain
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import cpu_fast

log = logging.getLogger("gpen")


class LiveStorage(TorchDispatchMode):
    """Counts the bytes of the storages made while it is on: `bytes` now, `peak` the most at once."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, list[int]] = {}  # storage -> [its bytes, tensors on it still alive]
        self.bytes = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {storage_of(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.hold(tensor, given)
        return out

    def hold(self, tensor: torch.Tensor, given: set[int]) -> None:
        # A storage is told apart by its address, not by _is_view(): in inference mode views are not marked.
        key = storage_of(tensor)
        if key not in self.storages:
            if key in given:  # a view of a tensor made before (a weight, the input): not the forward's
                return
            self.storages[key] = [0, 0]
        entry = self.storages[key]
        grown = tensor.untyped_storage().nbytes() - entry[0]  # a new storage, or one an op resized
        entry[0] += grown
        entry[1] += 1
        self.bytes += grown
        self.peak = max(self.peak, self.bytes)
        weakref.finalize(tensor, self.release, key)

    def release(self, key: int) -> None:
        entry = self.storages[key]
        entry[1] -= 1
        if not entry[1]:
            self.bytes -= entry[0]
            del self.storages[key]


def weight_bytes(network: nn.Module) -> int:
    """What a network's weights and buffers take where they are: what the working memory is counted beside."""
    return sum(t.numel() * t.element_size() for t in chain(network.parameters(), network.buffers()))


def storage_of(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def counted_peak(forward: Callable[[], object]) -> int:
    """The most bytes of tensors `forward()` holds at once of its own making (its result included), in
    inference mode as the handles run networks; with real tensors, the networks' CPU fast paths are left
    out, so that the count is of the path a GPU (and the meta device) takes."""
    with torch.inference_mode(), cpu_fast.plain_layers(), LiveStorage() as count:
        result = forward()
        del result
    return count.peak


def meta_copy(network: nn.Module) -> nn.Module:
    """The network with each weight and buffer an empty meta tensor of its shape, dtype and strides: nothing
    of the weights is copied."""
    memo = {id(t): meta_like(t) for t in chain(network.parameters(), network.buffers())}
    return copy.deepcopy(network, memo)


def meta_like(t: torch.Tensor) -> torch.Tensor:
    empty = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    return nn.Parameter(empty, requires_grad=False) if isinstance(t, nn.Parameter) else empty


Run = Callable[[nn.Module, torch.Tensor], object]
# network -> {(input shape, input dtype, weight dtype, run): bytes}; weakly, so that a network's counts go with it
_counted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forward_bytes(network: nn.Module, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                  run: Run | None = None) -> int:
    """The working memory of `run(network, x)` (by default `network(x)`) for an input x of `shape` and
    `dtype`, the network in its own dtype: counted on the meta device once per network, shape, dtypes and
    run, then remembered. A network the meta device cannot run (one that reads its data: `.item()`,
    `.numpy()`, a boolean mask) counts 0, with a warning: its memory is then left to ComfyUI's own reserve."""
    weights = next((t.dtype for t in chain(network.parameters(), network.buffers()) if t.is_floating_point()), None)
    key = (tuple(shape), dtype, weights, run)
    counts = _counted.setdefault(network, {})
    if key not in counts:
        try:  # a count is advice to ComfyUI: whatever stops it must not stop the run
            model, x = meta_copy(network), torch.empty(shape, dtype=dtype, device="meta")
            counts[key] = counted_peak(lambda: model(x) if run is None else run(model, x))
        except Exception as e:
            log.warning("%s's working memory is not counted: it does not run on the meta device (%s)",
                        type(network).__name__, str(e).splitlines()[0] if str(e) else type(e).__name__)
            counts[key] = 0
    return counts[key]
