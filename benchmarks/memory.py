"""Peak memory of one call, shared by the benchmark scripts: CUDA's allocator statistics on a GPU, a
live-tensor tracker on the CPU (tracemalloc cannot see torch's CPU allocator)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensors allocated by aten ops while active (CPU stand-in for max_memory_allocated)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or ptr in inputs or ptr in self.live:
                continue
            self.live[ptr] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._free, ptr)
        return out


def peak_bytes(fn: Callable[[], Any], device: str) -> int:
    """Bytes allocated at the peak of ``fn()`` (run under ``no_grad``) beyond what was allocated before."""
    with torch.no_grad():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - before
        with LiveBytes() as tracker:
            fn()
        return tracker.peak
