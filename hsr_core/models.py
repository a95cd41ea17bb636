"""Loading models and mapping their architecture.

``load_model`` resolves a hub id, a local folder or a ``builtin:`` name to a local folder and
loads it through transformers' Auto classes, with its tokenizer or processor. ``ModelAdapter``
finds, for any supported architecture, the language model's decoder layers, their attention
projections (``q/k/v/o_proj``), MLP projections, the final norm, the LM head and the head
geometry (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``), MHA and GQA alike.
Llama-3.2-Vision (``MllamaForConditionalGeneration``) interleaves self-attention layers with
cross-attention layers (``cross_attn.{q,k,v,o}_proj``: queries from the text, keys and values
from the vision states); the adapter maps both kinds, with the same head geometry, and says
which a layer is (``ModelAdapter.layer_kind``).

Everything HSR touches lives in the decoder layers of the language model (spec: "the vision
tower, the projector, embeddings and the LM head are never scored, pruned or restored").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .builtin import BuiltinModelError, materialize
from .config import ModelSpec, cuda_group
from .folders import damaged_weights
from .hub import hub_reachable

ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")

SUPPORTED = (
    "Llama, Mistral and Qwen2 text models (…ForCausalLM); LlavaForConditionalGeneration, "
    "LlavaNextForConditionalGeneration, Qwen2-VL, Qwen2.5-VL and Llama-3.2-Vision "
    "(MllamaForConditionalGeneration: self- and cross-attention layers)"
)


class ModelLoadError(RuntimeError):
    """A model could not be found, downloaded or loaded; the message says what to do."""


class ArchitectureError(ModelLoadError):
    """The model loaded but its layers could not be mapped to HSR's vocabulary."""


@dataclass
class ModelAdapter:
    """Where HSR's pieces live inside one loaded model.

    Attributes:
        layers_path: dotted module path of the decoder layer list, e.g.
            ``model.language_model.layers``.
        layers: the decoder layers (``num_hidden_layers`` of them).
        final_norm: the norm applied after the last decoder layer.
        lm_head: the output projection to the vocabulary.
        num_layers, num_heads, num_kv_heads, head_dim, hidden_size: the head geometry.
        mlp_projs: names of the MLP linears inside each layer's ``mlp``.
        cross_layers: the cross-attention layers (Mllama's ``cross_attention_layers``), whose
            attention lives at ``cross_attr``; every other layer's at ``attn_attr``.
    """

    layers_path: str
    layers: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    mlp_projs: tuple[str, ...]
    attn_attr: str = "self_attn"
    mlp_attr: str = "mlp"
    cross_layers: frozenset[int] = frozenset()
    cross_attr: str = "cross_attn"

    @property
    def group_size(self) -> int:
        """Query heads per KV head (``H / K``)."""
        return self.num_heads // self.num_kv_heads

    def layer_kind(self, layer: int) -> str:
        """``"cross"`` for a cross-attention layer (keys and values from the vision states),
        else ``"self"``."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        return "cross" if layer in self.cross_layers else "self"

    def layer_kinds(self) -> list[str]:
        """``layer_kind`` of every decoder layer, in order."""
        return [self.layer_kind(i) for i in range(self.num_layers)]

    def attention_attr(self, layer: int) -> str:
        """The attribute of decoder layer ``layer`` that holds its attention."""
        return self.cross_attr if self.layer_kind(layer) == "cross" else self.attn_attr

    def attention(self, layer: int) -> nn.Module:
        return getattr(self.layers[layer], self.attention_attr(layer))

    def linear(self, layer: int, proj: str) -> nn.Linear:
        """The linear ``proj`` (e.g. ``q_proj`` or ``down_proj``) of decoder layer ``layer``."""
        parent = (
            self.attention(layer)
            if proj in ATTN_PROJS
            else getattr(self.layers[layer], self.mlp_attr)
        )
        return getattr(parent, proj)

    def linear_name(self, layer: int, proj: str) -> str:
        """The full module name, as in ``model.named_modules()``."""
        attr = self.attention_attr(layer) if proj in ATTN_PROJS else self.mlp_attr
        return f"{self.layers_path}.{layer}.{attr}.{proj}"

    def linear_names(self, *, attention_only: bool = False) -> list[str]:
        """Names of every linear HSR works on, layer by layer."""
        projs = ATTN_PROJS if attention_only else ATTN_PROJS + self.mlp_projs
        return [self.linear_name(i, p) for i in range(self.num_layers) for p in projs]

    def iter_linears(self, *, attention_only: bool = False):
        """Yield ``(name, layer, proj, module)`` for every linear HSR works on."""
        projs = ATTN_PROJS if attention_only else ATTN_PROJS + self.mlp_projs
        for i in range(self.num_layers):
            for p in projs:
                yield self.linear_name(i, p), i, p, self.linear(i, p)

    def parse(self, name: str) -> tuple[int, str]:
        """``model.layers.3.self_attn.q_proj`` (or ``….cross_attn.q_proj``) -> ``(3, "q_proj")``."""
        rest = name[len(self.layers_path) + 1 :]
        layer, _, proj = rest.split(".")
        return int(layer), proj

    def num_linear_params(self) -> int:
        return sum(m.weight.numel() for *_, m in self.iter_linears())


def _has_linear(module: nn.Module, name: str) -> bool:
    return isinstance(getattr(module, name, None), nn.Linear)


def _layer_attention(layer: nn.Module) -> nn.Module | None:
    """A decoder layer's attention: ``self_attn``, or ``cross_attn`` (Mllama's cross layers)."""
    for attr in ("self_attn", "cross_attn"):
        attn = getattr(layer, attr, None)
        if attn is not None:
            return attn
    return None


def _is_decoder_layer(layer: nn.Module) -> bool:
    attn = _layer_attention(layer)
    mlp = getattr(layer, "mlp", None)
    return (
        attn is not None
        and mlp is not None
        and all(_has_linear(attn, p) for p in ATTN_PROJS)
        and any(isinstance(m, nn.Linear) for m in mlp.modules())
    )


def build_adapter(model: nn.Module) -> ModelAdapter:
    """Map a loaded model's language decoder to HSR's vocabulary.

    Args:
        model: a transformers model (text causal LM or vision-language model).

    Returns:
        The adapter.

    Raises:
        ArchitectureError: naming what was looked for when no decoder stack matches.
    """
    looked_for = (
        "a ModuleList of decoder layers, each with self_attn.{q,k,v,o}_proj linears and an mlp "
        "of linears (or cross_attn.{q,k,v,o}_proj, as Llama-3.2-Vision's cross-attention layers), "
        "whose parent module has a final `norm`, plus an output embedding (lm_head)"
    )
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList)
        and len(mod) > 0
        and all(_is_decoder_layer(x) for x in mod)
    ]
    if not candidates:
        raise ArchitectureError(
            f"Unsupported architecture {type(model).__name__}: could not find {looked_for}. "
            f"Supported: {SUPPORTED}."
        )
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    chosen = None
    if decoder is not None:
        for name, mod in candidates:
            if any(mod is m for m in decoder.modules()):
                chosen = (name, mod)
                break
    if chosen is None:
        chosen = max(candidates, key=lambda c: len(c[1]))
    layers_path, layers = chosen
    parent = model.get_submodule(layers_path.rsplit(".", 1)[0]) if "." in layers_path else model
    final_norm = getattr(parent, "norm", None)
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if final_norm is None or lm_head is None:
        missing = "final norm (`norm` beside the layers)" if final_norm is None else "lm_head"
        raise ArchitectureError(
            f"Unsupported architecture {type(model).__name__}: found decoder layers at "
            f"{layers_path} but no {missing}; looked for {looked_for}. Supported: {SUPPORTED}."
        )

    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    num_heads = int(cfg.num_attention_heads)
    num_kv = int(getattr(cfg, "num_key_value_heads", None) or num_heads)
    hidden = int(cfg.hidden_size)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // num_heads)
    cross = frozenset(i for i, x in enumerate(layers) if getattr(x, "self_attn", None) is None)
    geometry = {}
    for i, layer in enumerate(layers):  # every layer: Mllama's two kinds must agree too
        attn = _layer_attention(layer)
        where = f"layer {i} {'cross_attn' if i in cross else 'self_attn'}."
        geometry |= {
            f"{where}q_proj.out_features": (attn.q_proj.out_features, num_heads * head_dim),
            f"{where}k_proj.out_features": (attn.k_proj.out_features, num_kv * head_dim),
            f"{where}v_proj.out_features": (attn.v_proj.out_features, num_kv * head_dim),
            f"{where}o_proj.in_features": (attn.o_proj.in_features, num_heads * head_dim),
        }
    bad = {k: v for k, v in geometry.items() if v[0] != v[1]}
    if bad or num_heads % num_kv:
        raise ArchitectureError(
            f"Head geometry of {type(model).__name__} does not add up (H={num_heads}, "
            f"K={num_kv}, head_dim={head_dim}): {dict(list(bad.items())[:4]) or 'H not a multiple of K'}. "
            "Fused or non-standard attention is not supported."
        )
    mlp_projs = tuple(n for n, m in layers[0].mlp.named_children() if isinstance(m, nn.Linear))
    if not mlp_projs:
        raise ArchitectureError(f"{type(model).__name__}: the MLP has no direct linear children")
    return ModelAdapter(
        layers_path=layers_path,
        layers=layers,
        final_norm=final_norm,
        lm_head=lm_head,
        num_layers=len(layers),
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        hidden_size=hidden,
        mlp_projs=mlp_projs,
        cross_layers=cross,
    )


@dataclass
class LoadedModel:
    """A model ready for HSR: weights, tokenizer or processor, and the adapter.

    Attributes:
        spec: what was asked for.
        path: the local folder the weights were loaded from.
        model: the transformers model, in eval mode.
        tokenizer: the text tokenizer (the processor's, for vision-language models).
        processor: the multimodal processor, or None for text-only models.
        adapter: where layers, projections and heads live.
    """

    spec: ModelSpec
    path: Path
    model: nn.Module
    tokenizer: Any
    processor: Any | None
    adapter: ModelAdapter
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def is_vision(self) -> bool:
        return self.processor is not None

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go: the device of its input embeddings (for a model spread
        over several GPUs by a ``device_map``, the first of its group; accelerate's hooks move
        the hidden states from layer to layer), else that of the first decoder layer."""
        try:
            weight = getattr(self.model.get_input_embeddings(), "weight", None)
        except (AttributeError, NotImplementedError):  # a model without input embeddings
            weight = None
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
            return weight.device
        return self.adapter.attention(0).q_proj.weight.device

    @property
    def devices(self) -> list[torch.device]:
        """Every device holding a parameter, in the order of the parameters (one, unless a
        ``device_map`` spread the model over several GPUs)."""
        return list(dict.fromkeys(p.device for p in self.model.parameters()))

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.attention(0).q_proj.weight.dtype

    def describe(self) -> dict[str, Any]:
        """What was loaded, in numbers a user wants to see."""
        a = self.adapter
        n_params = sum(p.numel() for p in self.model.parameters())
        n_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {
            "model": self.spec.name,
            "path": str(self.path),
            "architecture": type(self.model).__name__,
            "parameters": n_params,
            "decoder_linear_parameters": a.num_linear_params(),
            "num_layers": a.num_layers,
            "num_heads": a.num_heads,
            "num_kv_heads": a.num_kv_heads,
            "head_dim": a.head_dim,
            "attention": "GQA" if a.num_kv_heads < a.num_heads else "MHA",
            "cross_attention_layers": sorted(a.cross_layers),
            "vision_tower": self.is_vision,
            "device": ", ".join(str(d) for d in self.devices),
            "dtype": str(self.dtype).replace("torch.", ""),
            "weights_memory_mb": round(n_bytes / 2**20, 1),
        }


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``.

    Raises:
        ModelLoadError: a CUDA device without a GPU, or a GPU index that is not visible.
    """
    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {device!r} was asked for but no CUDA GPU is visible; use --device cpu"
            )
        visible = torch.cuda.device_count() if device.startswith("cuda") else 0
        missing = [i for i in cuda_group(device) or () if i >= visible]
        if missing:
            raise ModelLoadError(
                f"device {device!r} names GPU {missing[0]}, but {visible} "
                f"{'is' if visible == 1 else 'are'} visible (0..{visible - 1}): name visible "
                "GPUs, or use --device auto"
            )
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def placement(device: str) -> tuple[str, dict[int, int] | None]:
    """The ``device_map`` and ``max_memory`` to load a model with on ``device`` (resolved).

    A group of several GPUs (``cuda:N,M,...``, or ``cuda`` with several visible: all of them)
    is ``device_map="auto"`` with ``max_memory`` listing those GPUs only, each with its free
    memory: accelerate then balances the decoder layers over the group and never places a part
    on another GPU, the CPU or the disk (a model too large for the group is refused after
    loading, ``check_placement``). Any single device is itself, without ``max_memory``.
    """
    group = cuda_group(device)
    if group is None and device == "cuda" and torch.cuda.device_count() > 1:
        group = tuple(range(torch.cuda.device_count()))
    if group is None or len(group) == 1:
        return device, None
    return "auto", {i: int(torch.cuda.mem_get_info(i)[0]) for i in group}


def check_placement(model: nn.Module, max_memory: dict[int, int] | None, what: str) -> None:
    """Refuse a model that a ``device_map`` placed partly outside its GPU group.

    accelerate puts what does not fit the GPUs on the CPU or the disk, keeping those weights
    outside the module (its hooks bring them in for each forward); HSR's masks and restores
    write the weights in place, so such a model cannot be pruned or realigned.

    Raises:
        ModelLoadError: naming the group and what to do.
    """
    where = getattr(model, "hf_device_map", None)
    if not max_memory or not where:
        return
    outside = sorted({str(d) for d in where.values() if d not in max_memory})
    if outside:
        gpus = ", ".join(str(i) for i in max_memory)
        raise ModelLoadError(
            f"{what} does not fit GPUs {gpus}: accelerate placed part of it on {', '.join(outside)}, "
            "whose weights HSR cannot edit. Give it more GPUs (--gpus-per-process, or "
            "--device cuda:N,M,...), use bfloat16, or pick a smaller model."
        )


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


_WEIGHT_IGNORE = ["*.pth", "*.pt", "*.msgpack", "*.h5", "*.ot", "*.onnx", "*.gguf", "original/*"]


def download(repo_id: str, revision: str | None, *, trust_remote_code: bool) -> Path:
    """Fetch a hub model (or find it in the local hub cache) and return its folder.

    Raises:
        ModelLoadError: unknown id, gated repository, or no network and nothing cached.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    ignore = list(_WEIGHT_IGNORE)
    if not trust_remote_code:
        ignore.append("*.py")
    try:
        try:  # a complete local snapshot is used as it is (works offline, no network wait)
            return Path(
                snapshot_download(
                    repo_id, revision=revision, ignore_patterns=ignore, local_files_only=True
                )
            )
        except LocalEntryNotFoundError:
            pass
        if not hub_reachable():
            raise ModelLoadError(
                f"Could not reach the Hugging Face hub to download {repo_id!r}, and it is not in "
                "the local hub cache. Check the network connection (or HF_ENDPOINT), or give a "
                "local folder or a builtin: model."
            )
        files = HfApi().list_repo_files(repo_id, revision=revision)
        if any(f.endswith(".safetensors") for f in files):
            ignore.append("*.bin")
        return Path(snapshot_download(repo_id, revision=revision, ignore_patterns=ignore))
    except GatedRepoError as e:
        raise ModelLoadError(
            f"{repo_id!r} is gated: accept its license on huggingface.co and log in "
            "(`hf auth login` or HF_TOKEN)."
        ) from e
    except RevisionNotFoundError as e:
        raise ModelLoadError(f"{repo_id!r} has no revision {revision!r}.") from e
    except RepositoryNotFoundError as e:
        raise ModelLoadError(
            f"No model {repo_id!r} on the Hugging Face hub (check the spelling; private "
            "repositories need a login), and no local folder of that name."
        ) from e


def resolve_path(spec: ModelSpec, cache_dir: Path | None, log: Callable[[str], None]) -> Path:
    """The local folder for ``spec``: built-in, existing folder, or hub download.

    Raises:
        ModelLoadError: also when a weight file of the folder is damaged (truncated: the
            built-in models are rebuilt instead, by ``materialize``).
    """
    name = spec.name.strip()
    if name.startswith("builtin:"):
        try:
            return materialize(name.split(":", 1)[1], cache_dir=cache_dir, log=log)
        except BuiltinModelError as e:
            raise ModelLoadError(str(e)) from e
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise ModelLoadError(
                f"Folder {folder} has no config.json: point at a save_pretrained folder."
            )
        damage = damaged_weights(folder)
        if damage is not None:
            raise ModelLoadError(
                f"The weights in {folder} are damaged ({damage}): save them again."
            )
        return folder
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"No folder {name!r} (and it is not a hub id like 'org/name').")
    log(f"Downloading {name} from the Hugging Face hub (first time only)...")
    path = download(name, spec.revision, trust_remote_code=spec.trust_remote_code)
    damage = damaged_weights(path)
    if damage is not None:
        raise ModelLoadError(
            f"The hub cache's copy of {name} in {path} is damaged ({damage}): delete that "
            "snapshot (huggingface-cli delete-cache) and load it again to download it anew."
        )
    return path


def _auto_class(config: Any):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto import modeling_auto as ma

    model_type = getattr(config, "model_type", None)
    if model_type in ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText, True
    if model_type in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM, False
    raise ArchitectureError(
        f"Model type {model_type!r} is neither a causal language model nor an image-text-to-text "
        f"model in transformers. Supported: {SUPPORTED}."
    )


def load_processor(path: Path, config: Any, *, trust_remote_code: bool = False) -> Any:
    """The multimodal processor of a vision-language model folder.

    transformers builds the processors of Qwen2-VL and Qwen2.5-VL with a video processor that
    needs torchvision, which this project does not install (its PyPI build wants another torch).
    HSR only ever sends images, so without torchvision (or when the folder has no video
    processor) the same processor class is built without its video processor; any other
    failure is raised as is.

    Raises:
        ModelLoadError: torchvision is missing and the processor cannot do without it.
    """
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import (
        PROCESSOR_MAPPING_NAMES,
        processor_class_from_name,
    )

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, OSError) as e:
        # ImportError: the video processor needs torchvision; OSError: the folder was saved by
        # such an image-only processor (e.g. an export of this project) and has no video part
        if "torchvision" not in str(e).lower() and "video processor" not in str(e).lower():
            raise
        name = PROCESSOR_MAPPING_NAMES.get(getattr(config, "model_type", None))
        cls = processor_class_from_name(name) if name else None
        if cls is None or "video_processor" not in cls.get_attributes():
            raise ModelLoadError(
                f"The processor of {path} needs torchvision (`pip install torchvision`): {e}"
            ) from e

    class ImageOnly(cls):  # type: ignore[misc, valid-type]
        @classmethod
        def get_attributes(cls) -> list[str]:
            return [a for a in super().get_attributes() if a != "video_processor"]

    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__
    return ImageOnly.from_pretrained(path, trust_remote_code=trust_remote_code)


def check_supported(path: Path, *, trust_remote_code: bool = False) -> None:
    """Raise ``ArchitectureError`` when HSR cannot map a model folder, without loading weights.

    The model is built from its config on the ``meta`` device (no memory), so a caller can
    refuse an unsupported model before releasing the one it holds.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise ArchitectureError(f"transformers cannot read {path}/config.json: {e}") from e
    auto_cls, _ = _auto_class(config)
    with torch.device("meta"):
        model = auto_cls.from_config(config, trust_remote_code=trust_remote_code)
    build_adapter(model)


def load_model(
    spec: ModelSpec | str,
    *,
    cache_dir: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a model for HSR.

    Args:
        spec: a ``ModelSpec`` or just a name (hub id, folder, ``builtin:…``).
        cache_dir: the project's cache root (built-in models are made there).
        log: receives short progress messages.

    Returns:
        The loaded model with its tokenizer/processor and adapter, in eval mode.

    Raises:
        ModelLoadError: what to do when the model cannot be found or loaded.
        ArchitectureError: when the architecture cannot be mapped.
    """
    from transformers import AutoConfig, AutoTokenizer

    if isinstance(spec, str):
        spec = ModelSpec(name=spec)
    log = log or (lambda _msg: None)
    path = resolve_path(spec, cache_dir, log)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    except ValueError as e:
        raise ArchitectureError(f"transformers cannot read {path}/config.json: {e}") from e
    auto_cls, is_vision = _auto_class(config)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    log(f"Loading {spec.name} ({dtype}, {device})...")
    device_map, max_memory = placement(device)
    extra = {} if max_memory is None else {"max_memory": max_memory}
    try:
        model = auto_cls.from_pretrained(
            path,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=spec.trust_remote_code,
            **extra,
        )
    except torch.OutOfMemoryError as e:
        raise ModelLoadError(
            f"Out of memory loading {spec.name} in {dtype} on {device}: pick a smaller model, "
            "bfloat16, more GPUs (--gpus-per-process), or the CPU."
        ) from e
    check_placement(model, max_memory, f"{spec.name} in {dtype}")
    model.eval()
    adapter = build_adapter(model)
    if is_vision:
        processor = load_processor(path, config, trust_remote_code=spec.trust_remote_code)
        tokenizer = processor.tokenizer
    else:
        processor = None
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None) and not getattr(
        processor, "chat_template", None
    ):
        raise ModelLoadError(
            f"{spec.name} has no chat template; HSR needs an instruction-tuned (chat) model."
        )
    loaded = LoadedModel(spec, Path(path), model, tokenizer, processor, adapter)
    loaded.info = loaded.describe()
    return loaded
