"""Known wrappers around a model, and compiled forwards.

* :func:`unwrap` finds the Hugging Face model inside ``torch.compile(model)`` (``OptimizedModule``),
  ``DistributedDataParallel`` / ``DataParallel`` and PEFT's ``PeftModel``; steer steers the model inside (the
  wrapper calls it) and says what it steered.
* :func:`is_compiled` tells whether the model's forward (or a submodule's) was compiled with ``torch.compile``:
  Dynamo does not guard module hooks by default, so hooks added after compiling would not take effect (and
  removed ones would linger) until the compiled code is rebuilt — the runtime resets Dynamo's caches then.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_DATA_PARALLEL = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")


def unwrap(target: Any) -> tuple[Any, list[str]]:
    """The innermost model and the wrappers around it, outermost first (``[]`` when ``target`` is the model)."""
    chain: list[str] = []
    while True:
        inner = getattr(target, "_orig_mod", None)
        if inner is not None and isinstance(inner, nn.Module):
            chain.append("torch.compile (OptimizedModule)")
            target = inner
            continue
        name = type(target).__name__
        if name in _DATA_PARALLEL and isinstance(getattr(target, "module", None), nn.Module):
            chain.append(name)
            target = target.module
            continue
        if any(cls.__name__ == "PeftModel" for cls in type(target).__mro__) and hasattr(target, "get_base_model"):
            chain.append(name)
            target = target.get_base_model()
            continue
        return target, chain


def is_compiled(model: nn.Module) -> bool:
    """The model's forward, or a submodule's, runs compiled code (``module.compile()`` or a compiled ``forward``)."""
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            return True
        forward = module.__dict__.get("forward")
        if forward is not None and hasattr(forward, "_torchdynamo_orig_callable"):
            return True
    return False


__all__ = ["is_compiled", "unwrap"]
