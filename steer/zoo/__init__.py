"""steer.zoo: offline tiny models of every supported family, and inputs for them.

Nothing here touches the network. `build` makes a random-weight model and its processor from configs;
`save` / `load` go through the real `save_pretrained` / `from_pretrained`; `tiny_path` / `load_tiny` keep one
saved folder per (family, seed) in `$STEER_ZOO_DIR` (default `~/.cache/steer/zoo`).

    from steer import zoo
    model, processor = zoo.load_tiny("qwen2_vl")
    prompt = zoo.chat_prompt("qwen2_vl", "What is shown?")
    inputs = zoo.make_inputs(processor, "qwen2_vl", [prompt], [[zoo.sample_image(0)]])
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)

    pipe = zoo.load_tiny_sd()              # tiny StableDiffusionPipeline ("sdxl": StableDiffusionXLPipeline)
"""

from .inputs import FAMILIES, QwenProcessorLite, chat_prompt, make_inputs, sample_image
from .sd import SD_KINDS, build_sd, load_sd, load_tiny_sd, make_clip_tokenizer, save_sd, sd_path
from .tiny import ZOO_VERSION, build, family_of, load, load_processor, load_tiny, save, tiny_path

__all__ = [
    "FAMILIES",
    "ZOO_VERSION",
    "QwenProcessorLite",
    "SD_KINDS",
    "build",
    "build_sd",
    "chat_prompt",
    "family_of",
    "load",
    "load_processor",
    "load_sd",
    "load_tiny",
    "load_tiny_sd",
    "make_clip_tokenizer",
    "make_inputs",
    "sample_image",
    "save",
    "save_sd",
    "sd_path",
    "tiny_path",
]
