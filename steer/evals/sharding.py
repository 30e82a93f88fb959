"""Several processes on one run (``accelerate launch``, ``WORLD_SIZE > 1``): who does which sample, on which device.

Process ``k`` of ``n`` takes the samples at positions ``k, k + n, ...`` of the canonical sample list
(:func:`shard_of`); the processes wait for each other through the ``accelerate`` state of
:func:`distributed_context`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

from steer.errors import EvalInputError

__all__ = ["distributed_context", "process_device_map", "shard_of"]

T = TypeVar("T")


def shard_of(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The items process ``rank`` of ``world_size`` owns: positions ``rank, rank + world_size, ...``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return [item for i, item in enumerate(items) if i % world_size == rank]


def distributed_context() -> tuple[int, int, Any]:
    """``(rank, world_size, state)``: from ``accelerate.PartialState`` when ``WORLD_SIZE > 1``, else ``(0, 1, None)``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, None
    import torch
    from accelerate import PartialState

    # without CUDA, accelerate only sets up a process group (gloo) when asked for CPU explicitly
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != world_size:
        raise EvalInputError(
            f"WORLD_SIZE is {world_size} but accelerate set up {state.num_processes} process(es); "
            "launch with `accelerate launch` or `torchrun` so that the processes can wait for each other"
        )
    return state.process_index, state.num_processes, state


def process_device_map(device_map: str | None, world_size: int, state: Any) -> Any:
    """The ``device_map`` to load with: the one asked for; when sharded and none was asked, this process's
    CUDA device (``{"": state.device}``), else ``None`` (the loader's default)."""
    if world_size <= 1 or device_map is not None:
        return device_map
    import torch

    return {"": state.device} if torch.cuda.is_available() else None
