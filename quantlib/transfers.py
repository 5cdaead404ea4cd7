"""Which tensors cross to the host: an audit of device→host reads, usable on a CPU-only machine.

On a GPU every `.cpu()`, `.numpy()` or `.tolist()` of a weight-sized tensor is a copy over the bus, and a weight copied to the host to be quantized there is the time issue 29 measured. On the CPU those
calls are free, so nothing would show them; `HostTransfers` records each of them (through torch's function
mode, which sees the call whatever the tensor's device) with the tensor's size, so a CPU test can assert that a
scheme's tensor work stays where the model lives: that only scalars and small tables come back, or, for the
formats whose math runs in numpy on the host (GGUF), that each weight goes there once.

`.to(device)` is not counted: on a CPU-only machine the model's device is the host, so a move to the model's
device and a read to the host are the same call there. Code never names the host in `.to()` on the tensor path
(the model's device, `tensor.device`, is what it names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostTransfers", "Transfer"]

_HOST_READS = {torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.__array__}


@dataclass(frozen=True)
class Transfer:
    call: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class HostTransfers(TorchFunctionMode):
    """Records every tensor read to the host with at least `min_numel` elements (smaller ones, scalars and
    code tables, are what a device run hands back by design)."""

    min_numel: int = 1024
    transfers: list[Transfer] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _HOST_READS and args and isinstance(args[0], torch.Tensor) and args[0].numel() >= self.min_numel:
            t = args[0]
            self.transfers.append(Transfer(getattr(func, "__name__", str(func)), tuple(t.shape),
                                           t.numel() * t.element_size()))
        return func(*args, **kwargs)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.transfers)

    def __hash__(self) -> int:  # a mode is pushed on a stack that hashes it
        return id(self)
