"""Test-side builders of tiny models for the architectures HSR supports beyond the built-ins.

Each builder writes a ``save_pretrained`` folder (weights, tokenizer or processor, chat
template) that the real loader (``hsr_core.models.load_model``) then loads, like the built-in
tiny Llama and LLaVA-NeXT of ``hsr_core.builtin``: random weights with a fixed seed, the
project's byte-level BPE tokenizer, 2 decoder layers, 4 query heads and 2 KV heads (GQA),
hidden size 64. The vision models get a one-block vision tower that sees 32x32 images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hsr_core.builtin import (
    CHATML_TEMPLATE,
    TINY_IMAGE_SIZE,
    build_tokenizer,
    tiny_clip_vision_config,
    tiny_llama_config,
    tiny_llava_processor,
)

QWEN_VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
QWEN_VL_TEMPLATE = CHATML_TEMPLATE.replace(
    "<image>\n", "<|vision_start|><|image_pad|><|vision_end|>"
)
TEXT_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    initializer_range=0.1,
    tie_word_embeddings=False,
)


def _token_ids(tokenizer: Any) -> dict[str, int]:
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _save(model: Any, tokenizer: Any, folder: Path, saver: Any) -> Path:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.eval().save_pretrained(folder)
    saver.save_pretrained(folder)
    return Path(folder)


def save_tiny_text(folder: Path, kind: str, *, seed: int = 0) -> Path:
    """A tiny ``MistralForCausalLM`` (``kind="mistral"``) or ``Qwen2ForCausalLM`` (``"qwen2"``,
    with its biased q/k/v projections)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    config_cls, model_cls = {
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[kind]
    config = config_cls(**TEXT_SIZES, **_token_ids(tokenizer))
    torch.manual_seed(seed)
    return _save(model_cls(config), tokenizer, folder, tokenizer)


def save_tiny_llava(folder: Path, *, seed: int = 0) -> Path:
    """A tiny plain ``LlavaForConditionalGeneration`` (CLIP tower, projector, tiny Llama)."""
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
    )
    processor = tiny_llava_processor(LlavaProcessor, image_processor, tokenizer)
    config = LlavaConfig(
        vision_config=tiny_clip_vision_config(),
        text_config=tiny_llama_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return _save(LlavaForConditionalGeneration(config), tokenizer, folder, processor)


def save_tiny_qwen_vl(folder: Path, version: str = "2", *, seed: int = 0) -> Path:
    """A tiny ``Qwen2VLForConditionalGeneration`` (``version="2"``) or
    ``Qwen2_5_VLForConditionalGeneration`` (``"2.5"``): one vision block with 8-pixel patches
    merged 2x2, so a 32x32 image becomes 4 image tokens, and 3-D rotary positions (mrope)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.auto.processing_auto import processor_class_from_name

    tokenizer = build_tokenizer()
    tokenizer.add_tokens(QWEN_VISION_TOKENS, special_tokens=True)
    pixels = TINY_IMAGE_SIZE * TINY_IMAGE_SIZE
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=8, merge_size=2, temporal_patch_size=2
    )
    # without torchvision the processor cannot hold its video processor (hsr_core.models.
    # load_processor loads such a folder the same way): saved under the real class name
    processor_cls = processor_class_from_name(
        "Qwen2VLProcessor" if version == "2" else "Qwen2_5_VLProcessor"
    )

    class ImageOnly(processor_cls):
        @classmethod
        def get_attributes(cls) -> list[str]:
            return [a for a in super().get_attributes() if a != "video_processor"]

    ImageOnly.__name__ = processor_cls.__name__
    processor = ImageOnly(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_VL_TEMPLATE
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_VISION_TOKENS}
    text = dict(
        **TEXT_SIZES,
        **_token_ids(tokenizer),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    vision = dict(
        depth=1,
        hidden_size=32,
        num_heads=2,
        in_channels=3,
        patch_size=8,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    if version == "2":
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision.update(embed_dim=32, hidden_size=TEXT_SIZES["hidden_size"], mlp_ratio=2)
    elif version == "2.5":
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision.update(
            intermediate_size=64,
            out_hidden_size=TEXT_SIZES["hidden_size"],
            window_size=16,
            fullatt_block_indexes=[0],
        )
    else:
        raise ValueError(f"unknown Qwen-VL version {version!r}")
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return _save(model_cls(config), tokenizer, folder, processor)


BUILDERS = {
    "mistral": lambda folder: save_tiny_text(folder, "mistral"),
    "qwen2": lambda folder: save_tiny_text(folder, "qwen2"),
    "plain-llava": save_tiny_llava,
    "qwen2-vl": lambda folder: save_tiny_qwen_vl(folder, "2"),
    "qwen2.5-vl": lambda folder: save_tiny_qwen_vl(folder, "2.5"),
}
"""Name -> builder writing the tiny model of that architecture into a folder."""
