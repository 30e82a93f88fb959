"""Image-and-text processors of the families whose real processor class cannot be constructed here.

`Qwen3VLProcessor`, `LlavaOnevisionProcessor`, `InternVLProcessor` and `SmolVLMProcessor` take a video
processor, and `ProcessorMixin.__init__` checks its class against `BaseVideoProcessor`, which needs
torchvision; `SmolVLMProcessor.__init__` also needs `num2words` (for video prompts). The classes below are
the real processor classes with only those two checks relaxed: ``video_processor`` may be None (no video
input) and `num2words` is not required. Their ``__call__`` is the real one, so the token layout (placeholder
expansion counts, marker tokens) is exactly the real processor's; `tests/test_families.py` checks it against
the layout each processor documents.

They save and load their parts (`save_pretrained` / `from_pretrained`): the tokenizer and the image
processor through their own real classes, and the processor's own settings (``image_seq_length``...) in
``steer_processor.json``, so a folder written by them is a normal Hugging Face folder plus that file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

from transformers import (
    AutoTokenizer,
    InternVLProcessor,
    LlavaOnevisionProcessor,
    Qwen3VLProcessor,
    SmolVLMProcessor,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.processing_utils import ProcessorMixin

SETTINGS_FILE = "steer_processor.json"


class VideoFree:
    """Mixin for a real processor class: no video processor (None), parts saved and loaded one by one.

    ``settings`` names the processor's own ``__init__`` arguments that are saved with it; ``image_processor_class``
    is the image processor class loaded back.
    """

    settings: ClassVar[tuple[str, ...]] = ()
    image_processor_class: ClassVar[type] = object
    tokenizer: Any
    image_processor: Any

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None  # no videos: the check would need torchvision's BaseVideoProcessor
        return ProcessorMixin.check_argument_for_proper_class(self, argument_name, argument)  # type: ignore[arg-type]

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the tokenizer, the image processor and the processor's settings into ``save_directory``."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path, **kwargs)
        self.image_processor.save_pretrained(path, **kwargs)
        values = {name: getattr(self, name) for name in self.settings}
        values["processor_class"] = type(self).__mro__[2].__name__  # the real class
        (path / SETTINGS_FILE).write_text(json.dumps(values, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> Any:
        """Load the parts with their own real ``from_pretrained`` and the settings file."""
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        image_processor = cls.image_processor_class.from_pretrained(path, **kwargs)  # type: ignore[attr-defined]
        settings_path = Path(path) / SETTINGS_FILE
        values = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
        values.pop("processor_class", None)
        return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, **values)  # type: ignore[call-arg]

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)


class Qwen3VLProcessorLite(VideoFree, Qwen3VLProcessor):  # type: ignore[misc]
    """`Qwen3VLProcessor` without a video processor: ``<|image_pad|>`` expanded to ``prod(grid_thw) / merge^2``
    copies, ``mm_token_type_ids`` returned."""

    image_processor_class = Qwen2VLImageProcessorPil


class LlavaOnevisionProcessorLite(VideoFree, LlavaOnevisionProcessor):  # type: ignore[misc]
    """`LlavaOnevisionProcessor` without a video processor (anyres-max token counts, ``batch_num_images``)."""

    settings = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")
    image_processor_class = LlavaOnevisionImageProcessorPil


class InternVLProcessorLite(VideoFree, InternVLProcessor):  # type: ignore[misc]
    """`InternVLProcessor` without a video processor: each image ``<img>`` + ``<IMG_CONTEXT>`` x
    (``image_seq_length`` per tile) + ``</img>``."""

    settings = ("image_seq_length",)
    image_processor_class = GotOcr2ImageProcessorPil


class SmolVLMProcessorLite(VideoFree, SmolVLMProcessor):  # type: ignore[misc]
    """`SmolVLMProcessor` without a video processor and without `num2words` (used for video prompts only)."""

    settings = ("image_seq_len",)
    image_processor_class = SmolVLMImageProcessorPil

    def __init__(
        self, image_processor: Any, tokenizer: Any, video_processor: Any = None, image_seq_len: int = 169, **kwargs: Any
    ) -> None:
        # SmolVLMProcessor.__init__ without its num2words import check
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, video_processor, **kwargs)


__all__ = [
    "InternVLProcessorLite",
    "LlavaOnevisionProcessorLite",
    "Qwen3VLProcessorLite",
    "SmolVLMProcessorLite",
    "VideoFree",
]
