"""Samples, the built-in sets, loaders, and chat encoding (docs/METHOD.md, "Data").

A ``Sample`` is a request, optionally an answer and an image. Two calibration sets feed HSR:
the safety set (harmful requests with refusals) and the utility set (benign requests with
helpful answers); the harmful prompts double as Ships probe prompts. Loaders cover the
built-in sets in ``assets/data``, VLGuard's ``train.json`` + image folder, and any local
JSON / JSONL / CSV file or ``datasets`` hub dataset through a column mapping.

``encode`` turns samples into model inputs through the model's chat template and marks which
tokens belong to the response, so Wanda statistics can count answer tokens only.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from .hub import hub_offline, hub_reachable

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_DIR = ASSETS / "data"
COLUMNS = ("prompt", "response", "image", "harmful")


class DataError(ValueError):
    """A dataset could not be read; the message names the file and row."""


class ImageError(DataError):
    """A file given as an image is not one that can be read."""


@dataclass(frozen=True)
class Sample:
    """One request (and optionally its answer and image).

    Attributes:
        prompt: the user's request.
        response: the reference answer (a refusal in the safety set), or None.
        image: path of an image file, or None.
        image_text: text to render as a typographic image when ``image`` is None.
        harmful: whether the request is harmful, when known.
        category: harm or topic category.
        id: a stable identifier.
    """

    prompt: str
    response: str | None = None
    image: str | None = None
    image_text: str | None = None
    harmful: bool | None = None
    category: str = ""
    id: str = ""

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.image_text is not None


@dataclass
class CalibrationData:
    """The two calibration sets (and where they came from)."""

    safety: list[Sample]
    utility: list[Sample]
    source: str = ""

    def __post_init__(self) -> None:
        if not self.safety:
            raise DataError(f"{self.source}: the safety set (harmful requests) is empty")
        if not self.utility:
            raise DataError(f"{self.source}: the utility set (benign requests) is empty")


# ---------------------------------------------------------------------------------------------
# images


@lru_cache(maxsize=512)
def render_text_image(text: str, size: int = 336) -> Any:
    """Render ``text`` as a typographic image (black on white), deterministic.

    Args:
        text: the text to draw, wrapped to fit.
        size: width and height in pixels.

    Returns:
        An RGB ``PIL.Image``.
    """
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    font_size = max(12, size // 14)
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow without FreeType
        font = ImageFont.load_default()
    chars = max(8, int(size / (font_size * 0.55)))
    y = size // 16
    for line in textwrap.wrap(text, width=chars)[: max(1, (size - y) // (font_size + 4))]:
        draw.text((size // 16, y), line, fill="black", font=font)
        y += font_size + 4
    return img


def open_image(path: str | Path) -> Any:
    """The image file at ``path`` as RGB PIL, fully decoded (a truncated file fails here).

    Raises:
        ImageError: the file is missing, not an image, or damaged; the message names it.
    """
    from PIL import Image, UnidentifiedImageError

    name = Path(path).name
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except UnidentifiedImageError:
        raise ImageError(
            f"{name} is not an image: give a PNG, JPEG, WebP, GIF or BMP file"
        ) from None
    except (OSError, ValueError) as e:
        raise ImageError(f"cannot read the image {name}: {e}") from e


def load_image(sample: Sample) -> Any | None:
    """The sample's image as RGB PIL, or None."""
    if sample.image is not None:
        try:
            return open_image(sample.image)
        except ImageError as e:
            raise ImageError(f"{e} (image {sample.image!r} of sample {sample.id!r})") from e
    if sample.image_text is not None:
        return render_text_image(sample.image_text)
    return None


# ---------------------------------------------------------------------------------------------
# loaders


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: row {i}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a local .jsonl, .json (a list of objects) or .csv file."""
    if not path.exists():
        raise DataError(f"no data file {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e
        if (
            isinstance(data, dict)
            and len(data) == 1
            and isinstance(next(iter(data.values())), list)
        ):
            data = next(iter(data.values()))
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        for i, row in enumerate(data, start=1):
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {i}: expected a JSON object")
        return data
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .csv")


def _as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in (
        "true",
        "1",
        "yes",
        "harmful",
        "unsafe",
    ):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "benign", "safe"):
        return False
    raise DataError(f"{where}: cannot read {value!r} as true/false")


def rows_to_samples(
    rows: Sequence[dict[str, Any]],
    source: str,
    columns: dict[str, str] | None = None,
    *,
    need_response: bool = False,
    base_dir: Path | None = None,
    image_paths: bool = True,
) -> list[Sample]:
    """Turn table rows into samples through a column mapping.

    Args:
        rows: dict rows.
        source: file name or dataset id, for error messages.
        columns: maps ``prompt``, ``response``, ``image``, ``harmful`` to the table's column
            names (identity when omitted).
        need_response: every row must have a non-empty response.
        base_dir: relative image paths are resolved against it.
        image_paths: rows may name image files; False refuses a row that does, before its path
            is looked at (rows from someone who may not read this machine's files).

    Raises:
        DataError: naming the source and the row.
    """
    cols = {c: c for c in COLUMNS}
    if columns:
        unknown = set(columns) - set(COLUMNS)
        if unknown:
            raise DataError(f"unknown column mapping keys {sorted(unknown)}; use {list(COLUMNS)}")
        cols.update(columns)
    samples = []
    for i, row in enumerate(rows, start=1):
        where = f"{source}: row {i}"
        prompt = row.get(cols["prompt"])
        if not isinstance(prompt, str) or not prompt.strip():
            have = ", ".join(sorted(map(str, row))) or "none"
            raise DataError(
                f"{where}: no text in the prompt column {cols['prompt']!r} (columns: {have}); "
                "map it with prompt=<column>"
            )
        response = row.get(cols["response"])
        if response is not None and not isinstance(response, str):
            raise DataError(f"{where}: response must be text, got {type(response).__name__}")
        if need_response and not (response and response.strip()):
            raise DataError(f"{where}: empty response in column {cols['response']!r}")
        image = row.get(cols["image"])
        if image is not None and image != "":
            if not isinstance(image, str):
                raise DataError(f"{where}: image must be a file path")
            if not image_paths:
                raise DataError(
                    f"{where}: names an image file, and this source may not name files "
                    "(remove the image column)"
                )
            image_path = Path(image)
            if base_dir is not None and not image_path.is_absolute():
                image_path = base_dir / image_path
            if not image_path.exists():
                raise DataError(f"{where}: image file {str(image_path)!r} does not exist")
            image = str(image_path)
        else:
            image = None
        harmful = row.get(cols["harmful"])
        harmful = None if harmful is None or harmful == "" else _as_bool(harmful, where)
        samples.append(
            Sample(
                prompt=prompt.strip(),
                response=response,
                image=image,
                harmful=harmful,
                category=str(row.get("category") or ""),
                id=str(row.get("id") or f"{Path(source).name}:{i}"),
            )
        )
    if not samples:
        raise DataError(f"{source}: no rows")
    return samples


def load_table(
    source: str | Path,
    columns: dict[str, str] | None = None,
    *,
    split: str = "train",
    need_response: bool = False,
    image_paths: bool = True,
) -> list[Sample]:
    """Samples from a local JSON/JSONL/CSV file or a ``datasets`` hub dataset id (rows may
    name image files unless ``image_paths`` is False)."""
    path = Path(source).expanduser()
    if path.exists():
        return rows_to_samples(
            _read_rows(path),
            str(path),
            columns,
            need_response=need_response,
            base_dir=path.parent,
            image_paths=image_paths,
        )
    if str(source).endswith((".json", ".jsonl", ".csv")):
        raise DataError(f"no data file {source}")
    where = _hub_dataset(str(source))
    try:
        import datasets

        ds = datasets.load_dataset(where, split=split)
    except Exception as e:
        raise DataError(
            f"could not load dataset {source!r} (split {split!r}) from the hub: "
            f"{type(e).__name__}: {e}. Check the id and the network, or give a local file."
        ) from e
    return rows_to_samples(
        list(ds), str(source), columns, need_response=need_response, image_paths=image_paths
    )


def _hub_dataset(repo_id: str) -> str:
    """Where ``datasets`` loads a hub dataset from: the id when the hub answers, else the
    dataset's snapshot in the local hub cache, read as a folder.

    Asked first because, with no network, ``datasets`` retries for about 20 s before it fails.

    Raises:
        DataError: the hub cannot be reached (``HF_HUB_OFFLINE``, or no connection) and the
            dataset is not in the local hub cache.
    """
    if hub_reachable():
        return repo_id
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
    except Exception:  # not cached, or not a valid id: either way nothing to load offline
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "no connection to it"
        raise DataError(
            f"The Hugging Face hub is unreachable ({why}) and the dataset {repo_id!r} is not in "
            "the local hub cache: use a local JSON, JSONL or CSV file instead (or connect, "
            "and load it once to cache it)."
        ) from None


VLGUARD_POOLS = ("reference", "all")
"""VLGuard splits: ``reference`` (the HSR release's ``get_data.py``) or ``all`` (every pair)."""


def _vlguard_image(base: Path, entry: dict[str, Any], where: str) -> Path:
    image = base / entry["image"]
    if not image.exists():
        image = base / "images" / entry["image"]
    if not image.exists():
        raise DataError(f"{where}: image {entry['image']!r} not found under {base}")
    return image


def load_vlguard(
    folder: str | Path, *, json_name: str = "train.json", pool: str = "reference"
) -> CalibrationData:
    """VLGuard's ``train.json`` and image folder as the two calibration sets.

    ``pool="reference"`` (the default) is the HSR release's split (``data_process/get_data.py``
    in ``TheShineyue/HSR``, commit ``f1932f1aea675c7d7a4444c47ac9f48a5c82ddd1``):

    - safety set (``train_unsafes``): the entries with ``safe`` false (unsafe images), each
      with its *first* instruction-response pair (``instr-resp[0]``: ``instruction`` and
      ``response``, VLGuard's refusal);
    - utility set (``train_safe_safes``): the entries with ``safe`` true (safe images), each
      with the first pair that has a ``safe_instruction``, and its response. A safe image
      without one is left out (the reference would write a null question).

    ``pool="all"`` (``vlguard-all:DIR``) is a broader pool, this project's earlier default: the
    same utility set, and as safety set every pair of an unsafe image plus the
    ``unsafe_instruction`` pairs of safe images (about twice the reference's safety set).

    Raises:
        DataError: no ``train.json``, invalid JSON, an entry without ``image`` / ``instr-resp``,
            an image that is not there, a pair without its instruction or response.
    """
    if pool not in VLGUARD_POOLS:
        raise DataError(f"unknown VLGuard pool {pool!r}; choose one of {VLGUARD_POOLS}")
    folder = Path(folder).expanduser()
    path = folder / json_name if folder.is_dir() else folder
    base = path.parent
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"no VLGuard {json_name} in {folder}") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e
    safety, utility = [], []
    for i, entry in enumerate(entries, start=1):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict) or "image" not in entry or "instr-resp" not in entry:
            raise DataError(f"{where}: expected keys 'image', 'safe' and 'instr-resp'")
        image = str(_vlguard_image(base, entry, where))
        pairs = entry["instr-resp"]
        if not isinstance(pairs, list) or not pairs:
            raise DataError(f"{where}: 'instr-resp' must be a non-empty list")
        for j, ir in enumerate(pairs):
            if not isinstance(ir, dict) or not isinstance(ir.get("response"), str):
                raise DataError(f"{where}, instr-resp {j}: no response")
        safe_image = _as_bool(entry.get("safe", False), where)
        key = entry.get("id", i)
        if safe_image:
            for j, ir in enumerate(pairs):
                if "safe_instruction" in ir:
                    utility.append(
                        Sample(
                            ir["safe_instruction"],
                            ir["response"],
                            image,
                            harmful=False,
                            id=f"{key}-{j}",
                        )
                    )
                    break
            if pool == "all":
                for j, ir in enumerate(pairs):
                    if "unsafe_instruction" in ir:
                        safety.append(
                            Sample(
                                ir["unsafe_instruction"],
                                ir["response"],
                                image,
                                harmful=True,
                                id=f"{key}-{j}",
                            )
                        )
            continue
        chosen = list(enumerate(pairs)) if pool == "all" else [(0, pairs[0])]
        for j, ir in chosen:
            prompt = ir.get("instruction")
            if pool == "all":
                prompt = prompt or ir.get("unsafe_instruction") or ir.get("safe_instruction")
            if not isinstance(prompt, str):
                raise DataError(f"{where}, instr-resp {j}: no 'instruction' key")
            safety.append(Sample(prompt, ir["response"], image, harmful=True, id=f"{key}-{j}"))
    label = "reference split" if pool == "reference" else "all pairs"
    return CalibrationData(safety, utility, source=f"VLGuard {path} ({label})")


def _builtin_rows(name: str) -> list[dict[str, Any]]:
    return _read_jsonl(BUILTIN_DIR / f"{name}.jsonl")


def with_typographic_images(samples: Sequence[Sample]) -> list[Sample]:
    """Attach a typographic rendering of each request as its image (for vision models)."""
    return [s if s.has_image else replace(s, image_text=s.prompt) for s in samples]


def builtin_calibration() -> CalibrationData:
    """The project's built-in safety (harmful + refusal) and utility (benign + answer) sets."""
    safety = rows_to_samples(_builtin_rows("harmful"), "builtin harmful.jsonl", need_response=True)
    utility = rows_to_samples(_builtin_rows("benign"), "builtin benign.jsonl", need_response=True)
    safety = [replace(s, harmful=True) for s in safety]
    utility = [replace(s, harmful=False) for s in utility]
    return CalibrationData(safety, utility, source="builtin")


def builtin_eval() -> list[Sample]:
    """The held-out built-in evaluation split (harmful, benign and borderline prompts)."""
    rows = _builtin_rows("eval")
    return rows_to_samples(rows, "builtin eval.jsonl", {"response": "reference"})


EXAMPLE_KINDS = ("harmful", "borderline", "benign")


@lru_cache(maxsize=4)
def builtin_examples(per_kind: int = 3) -> tuple[tuple[str, str, str], ...]:
    """``(kind, category, prompt)`` examples from the built-in evaluation split: ``per_kind``
    harmful, borderline and benign prompts, each from another category."""
    kinds = {row.get("id"): row.get("kind") for row in _builtin_rows("eval")}
    picked: dict[str, list[tuple[str, str, str]]] = {k: [] for k in EXAMPLE_KINDS}
    for s in builtin_eval():
        kind = kinds.get(s.id) or ("harmful" if s.harmful else "benign")
        rows = picked.get(kind)
        if rows is not None and len(rows) < per_kind and all(r[1] != s.category for r in rows):
            rows.append((kind, s.category, s.prompt))
    return tuple(r for k in EXAMPLE_KINDS for r in picked[k])


def load_eval(source: str | Path, *, image_paths: bool = True) -> list[Sample]:
    """Evaluation prompts: ``builtin`` or a JSONL of ``{"prompt", "harmful", "image"?}`` (whose
    rows may name image files unless ``image_paths`` is False)."""
    if str(source) == "builtin":
        return builtin_eval()
    path = Path(source).expanduser()
    if path.exists():
        # the reference answer (for the perplexity proxy) may be called response or reference
        rows = [
            {**r, "response": r.get("response") or r.get("reference")} for r in _read_rows(path)
        ]
        samples = rows_to_samples(rows, str(path), base_dir=path.parent, image_paths=image_paths)
    else:
        samples = load_table(source, image_paths=image_paths)
    for i, s in enumerate(samples, start=1):
        if s.harmful is None:
            raise DataError(f"{source}: row {i}: missing 'harmful' (true or false)")
    return samples


def load_calibration(
    source: str,
    *,
    columns: dict[str, str] | None = None,
    utility_source: str | None = None,
    split: str = "train",
    image_paths: bool = True,
) -> CalibrationData:
    """The two calibration sets from a data spec.

    Args:
        source: ``builtin``; a VLGuard folder (holding ``train.json``) or ``vlguard:<folder>``
            (the reference's split), ``vlguard-all:<folder>`` (every pair, see ``load_vlguard``);
            a file or hub dataset with a ``harmful`` column that splits it; or, with
            ``utility_source``, the safety set alone.
        columns: column mapping for files and hub datasets.
        utility_source: a separate file or dataset for the utility set.
        split: the hub dataset split.
        image_paths: rows of files and hub datasets may name image files (False refuses
            them; ``rows_to_samples``).
    """
    if source == "builtin":
        return builtin_calibration()
    if source.startswith("vlguard:"):
        return load_vlguard(source.split(":", 1)[1])
    if source.startswith("vlguard-all:"):
        return load_vlguard(source.split(":", 1)[1], pool="all")
    if Path(source).is_dir():
        if (Path(source) / "train.json").exists():
            return load_vlguard(source)
        raise DataError(f"folder {source} holds no VLGuard train.json")
    table = {"split": split, "need_response": True, "image_paths": image_paths}
    rows = load_table(source, columns, **table)
    if utility_source is not None:
        utility = load_table(utility_source, columns, **table)
        return CalibrationData(rows, utility, source=f"{source} + {utility_source}")
    if any(s.harmful is None for s in rows):
        raise DataError(
            f"{source}: to split one table into safety and utility sets every row needs a "
            "'harmful' column (map it with harmful=<column>), or give the utility set separately"
        )
    return CalibrationData(
        [s for s in rows if s.harmful], [s for s in rows if not s.harmful], source=source
    )


def select(samples: Sequence[Sample], n: int, seed: int = 0) -> list[Sample]:
    """A reproducible subset of ``n`` samples (all of them, in order, when there are fewer)."""
    if n >= len(samples):
        return list(samples)
    idx = sorted(random.Random(seed).sample(range(len(samples)), n))
    return [samples[i] for i in idx]


def fingerprint(samples: Sequence[Sample]) -> str:
    """SHA-256 over the samples' text and images, for cache keys."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.prompt, s.response, s.image_text]).encode())
        if s.image is not None:
            h.update(hashlib.sha256(Path(s.image).read_bytes()).digest())
    return h.hexdigest()[:16]
