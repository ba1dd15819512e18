"""What every handle over a network shares: the network (a torch module or an ONNX runner), its spec,
what it is, the face size it takes, where it runs and what its weights take there."""

from __future__ import annotations

import torch

from ..archs.spec import ArchSpec
from ..archs.working_memory import forward_bytes, weight_bytes


class NetworkHandle:
    def __init__(self, network, spec: ArchSpec):
        self.network, self.spec = network, spec
        self.size = spec.size_of(network)
        self.info = getattr(network, "info", None)  # the ModelInfo the registry gave it

    @property
    def device(self) -> torch.device:
        return self._weight().device if self.is_torch else self.network.device

    @property
    def dtype(self) -> torch.dtype:
        """What the network computes in; ONNX runners take float32 and convert to their file's own."""
        return self._weight().dtype if self.is_torch else torch.float32

    @property
    def is_torch(self) -> bool:
        return isinstance(self.network, torch.nn.Module)

    @property
    def memory_bytes(self) -> int:
        """What the weights take on their device; 0 for onnxruntime's, which keeps its own."""
        if not self.is_torch:
            return 0
        return weight_bytes(self.network)

    def working_bytes(self, batch: int) -> int:
        """What `batch` crops through the network take on its device beyond the weights: its input at the
        network's size in its dtype and what the forward makes, counted (archs/working_memory.py). 0 for
        onnxruntime's, which keeps its own memory (ComfyUI does not manage it)."""
        if not self.is_torch:
            return 0
        shape = (batch, self.size, self.size, 3) if self.spec.convention.layout == "nhwc" else \
            (batch, 3, self.size, self.size)
        forward = forward_bytes(self.network, shape, self.dtype, self.spec.run)  # run as spec.forward runs it
        return batch * 3 * self.size ** 2 * self.dtype.itemsize + forward

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """Moves a torch network (in place); onnxruntime's stay where their session runs."""
        if self.is_torch:
            self.network.to(device=device, dtype=dtype)
        return self

    def _weight(self) -> torch.Tensor:
        return next(self.network.parameters())
