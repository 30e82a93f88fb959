"""Model + processor loading for ``steer eval``.

* A local folder written by :mod:`steer.zoo` (a tiny random-weight model) goes through ``steer.zoo.load``.
* Any other local folder or hub id goes through ``AutoModelForImageTextToText.from_pretrained`` and
  ``AutoProcessor.from_pretrained`` with ``dtype``, ``device_map``, ``attn_implementation`` and, when asked,
  a ``BitsAndBytesConfig`` for 4-/8-bit weights (bitsandbytes is imported lazily, only then).
  For a local folder whose processor cannot be built by ``AutoProcessor`` (the Qwen processors need
  torchvision) the zoo's torchvision-free processor is used instead.

Nothing here is imported by ``steer`` at start-up; torch and transformers load when a model is loaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steer.errors import EvalInputError

__all__ = [
    "DTYPES",
    "LoadedModel",
    "ZOO_MODEL_TYPES",
    "is_zoo_folder",
    "load_model",
    "quantization_config",
    "resolve_model_name",
]

DTYPES = ("auto", "float32", "float16", "bfloat16")
"""Accepted ``--dtype`` values."""

ZOO_MODEL_TYPES: dict[str, str] = {
    "llava": "llava",
    "llava_next": "llava_next",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
}
"""``config.model_type`` -> the zoo/prompt family name used by :func:`steer.zoo.chat_prompt`."""


@dataclass
class LoadedModel:
    """A loaded model with its processor and what is needed to prompt it.

    ``family`` is steer's adapter family (``llava-1.5``, ``llava-next``, ``qwen2-vl``, ``qwen2.5-vl``);
    ``model_type`` the config's ``model_type`` (``llava``, ...); ``source`` one of ``builtin``, ``zoo``, ``local``,
    ``hub``; ``info`` what was actually used (dtype, device map, quantization, attention backend).
    """

    model: Any
    processor: Any
    name: str
    family: str
    model_type: str
    source: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_family(self) -> str:
        """The family name of :func:`steer.zoo.chat_prompt` (``llava``, ``llava_next``, ``qwen2_vl``, ...)."""
        return ZOO_MODEL_TYPES.get(self.model_type, self.model_type)


def resolve_model_name(model: str) -> str:
    """A local path as an absolute path (so ``./m`` and ``/abs/m`` name the same run); a hub id unchanged."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def is_zoo_folder(path: str | Path) -> bool:
    """True for a folder written by ``steer.zoo.save``: a supported ``model_type`` with the zoo's tiny shape
    (4-layer, 64-wide text decoder and a byte-level vocabulary of a few hundred tokens)."""
    path = Path(path)
    if not path.is_dir():
        return False
    config = _read_config(path)
    text = config.get("text_config") or {}
    return (
        config.get("model_type") in ZOO_MODEL_TYPES
        and text.get("hidden_size") == 64
        and text.get("num_hidden_layers") == 4
        and int(text.get("vocab_size") or 10**9) < 1024
    )


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_hub_id(model: str) -> None:
    """A model that is no local folder must look like a hub id, and be in the cache when offline.

    Raises:
        EvalInputError: a path that does not exist (it says so), or an id not cached while ``HF_HUB_OFFLINE`` is
            set (at once, instead of retrying the network).
    """
    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1)
    if looks_like_path or not _HUB_ID.match(model):
        raise EvalInputError(f"--model {model}: no such folder (and not a hub id such as org/name)")
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(model, "config.json"), str):
        raise EvalInputError(
            f"--model {model}: not a local folder, and not in the Hugging Face cache while offline (HF_HUB_OFFLINE "
            "is set). Give the folder of a downloaded checkpoint, download it first, or unset HF_HUB_OFFLINE."
        )


def check_supported(config: dict[str, Any], model: str) -> None:
    """Refuse a saved model whose class steer has no adapter for before its weights load."""
    from steer.adapters import supported_classes
    from steer.errors import UnsupportedModelError

    architectures = [str(a) for a in config.get("architectures") or []]
    if architectures and not any(a in supported_classes() for a in architectures):
        raise UnsupportedModelError(
            f"--model {model}: a {', '.join(architectures)} checkpoint; steer has no adapter for it. Supported model "
            f"classes: {', '.join(supported_classes())}."
        )


def _torch_dtype(dtype: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise EvalInputError(f"unknown --dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, dtype: str) -> Any:
    """The ``BitsAndBytesConfig`` for ``--load-in-4bit``/``--load-in-8bit`` (``None`` for neither).

    Raises:
        EvalInputError: both asked, or bitsandbytes is not installed.
    """
    if load_in_4bit and load_in_8bit:
        raise EvalInputError("give --load-in-4bit or --load-in-8bit, not both")
    if not (load_in_4bit or load_in_8bit):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise EvalInputError(
            "4-/8-bit loading needs bitsandbytes, which is not installed: pip install 'steer-toolkit[quant]' "
            "(or pip install bitsandbytes), or drop --load-in-4bit/--load-in-8bit"
        )
    import torch
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.float16 if dtype in ("auto", "float32") else getattr(torch, dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute, bnb_4bit_quant_type="nf4")


def _default_device_map(device_map: Any) -> Any:
    """``None`` on a CPU-only machine, ``"auto"`` where CUDA is available, else what was given."""
    if device_map is not None:
        return device_map
    import torch

    return "auto" if torch.cuda.is_available() else None


def _load_processor(name: str, local: bool, model_type: str) -> Any:
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name, local_files_only=local)
    except Exception as err:  # fall back to the zoo processor below, or explain
        if not (local and model_type in ZOO_MODEL_TYPES):
            raise EvalInputError(f"cannot load the processor of {name}: {err}") from None
        from steer import zoo

        processor = zoo.load_processor(name, ZOO_MODEL_TYPES[model_type])
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise EvalInputError(f"{name}: the processor has no tokenizer; is this a vision-language model?")
    tokenizer.padding_side = "left"
    return processor


def load_model(
    model: str,
    *,
    dtype: str = "auto",
    device_map: Any = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load ``model`` (a local folder, a hub id or ``builtin:demo``) and its processor for generation.

    Args:
        model: a folder written by ``steer.zoo.save``, a local checkpoint folder, a hub id, or ``builtin:demo``
            (the trained steer-demo-llava shipped in ``steer/zoo/demo/``).
        dtype: ``auto`` (the checkpoint's dtype), ``float32``, ``float16`` or ``bfloat16``.
        device_map: passed to ``from_pretrained``; ``None`` means ``"auto"`` when CUDA is available, else CPU.
            Under ``accelerate launch`` ``steer eval`` passes ``{"": <this process's device>}``.
        load_in_4bit / load_in_8bit: quantize with bitsandbytes (``pip install 'steer-toolkit[quant]'``).
        attn_implementation: ``sdpa`` (default of transformers), ``eager``, ``flash_attention_2``, ...

    Raises:
        EvalInputError: bitsandbytes missing, both quantizations asked, an unknown dtype, a model that cannot
            be loaded (e.g. a hub id while offline), or a model class steer has no adapter for.
    """
    from steer.adapters import adapter_for
    from steer.evals import builtin

    torch_dtype = _torch_dtype(dtype)
    quantization = quantization_config(load_in_4bit, load_in_8bit, dtype)
    device_map = _default_device_map(device_map)
    requested = model
    demo = builtin.is_builtin(model)
    if demo:
        model = builtin.resolve_model(model)
    path = Path(model).expanduser()
    local = path.is_dir()
    if path.exists() and not local:
        raise EvalInputError(f"--model {model}: expected a model folder or a hub id, got a file")
    if not local:
        check_hub_id(model)
    name = str(path.resolve()) if local else model
    attn = attn_implementation or "sdpa"
    if local and not (path / "config.json").is_file():
        raise EvalInputError(f"--model {model}: the folder has no config.json")
    model_type = str(_read_config(path).get("model_type", "")) if local else ""
    if local:
        check_supported(_read_config(path), model)

    if local and (demo or is_zoo_folder(path)) and quantization is None:
        from steer import zoo

        zoo_dtype = None if torch_dtype == "auto" else torch_dtype
        kwargs: dict[str, Any] = {"attn_implementation": attn, "device_map": device_map}
        if zoo_dtype is not None:
            kwargs["dtype"] = zoo_dtype
        loaded, processor = zoo.load(path, **kwargs)
        processor.tokenizer.padding_side = "left"
        source = "builtin" if demo else "zoo"
    else:
        from transformers import AutoModelForImageTextToText

        kwargs = {"dtype": torch_dtype, "device_map": device_map, "local_files_only": local}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        if quantization is not None:
            kwargs["quantization_config"] = quantization
        try:
            loaded = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
        except (OSError, ValueError) as err:
            raise EvalInputError(f"cannot load model {model!r}: {err}") from None
        loaded.eval()
        model_type = model_type or str(getattr(loaded.config, "model_type", ""))
        processor = _load_processor(name, local, model_type)
        source = "local" if local else "hub"
    gen = loaded.generation_config
    if gen.pad_token_id is None:
        gen.pad_token_id = processor.tokenizer.pad_token_id
    family = adapter_for(loaded).family  # UnsupportedModelError names the supported classes
    info = {
        "dtype": str(getattr(loaded, "dtype", "")).replace("torch.", ""),
        "device": str(getattr(loaded, "device", "")),
        "device_map": device_map if isinstance(device_map, (str, type(None))) else str(device_map),
        "quantization": "4bit" if load_in_4bit else "8bit" if load_in_8bit else None,
        "attn_implementation": getattr(loaded.config, "_attn_implementation", attn),
        "model_class": type(loaded).__name__,
        "processor_class": type(processor).__name__,
    }
    return LoadedModel(
        model=loaded,
        processor=processor,
        name=requested if demo else name,
        family=family,
        model_type=model_type or str(getattr(loaded.config, "model_type", "")),
        source=source,
        info=info,
    )
