"""Public mode: what the app lets a visitor do when anyone can reach it (a Hugging Face Space).

This file is the one place that says it. ``Policy`` is frozen and read once from the
environment at start-up (``POLICY``); the model tab, the data loader, the evaluation upload, the
export tab, the page's session state and the launch ask it, and each refusal is a ``Refused``
error whose message says what is allowed instead (``ui.events`` shows it as a ``gr.Error``, in
the page and through the API).

Public mode is on when ``SPACE_ID`` is set (Hugging Face sets it in every Space) or
``HSR_PUBLIC=1``; ``HSR_PUBLIC=0`` turns it off (a private Space used by its owner alone). Off,
nothing here changes anything: ``python app.py`` on one's own machine behaves as without this
file. On, a visitor:

- uses the one model the operator serves (``HSR_MODEL``, default the built-in
  ``builtin:smollm2-135m-safe``, with dtype and device ``auto``): one model is shared by every
  session of the process (``ui.workbench``), so a visitor's Load only loads or selects that
  model and can never replace it under another visitor's chat. ``HSR_MODEL`` must be on the
  allow-list: the built-in models and the hub ids of ``HSR_MODELS`` (comma-separated); a local
  path is never allowed;
- reads no file or folder of the server: calibration data is the built-in set, a hub dataset
  on ``HSR_DATASETS`` (comma-separated; none by default) or an upload, and rows may not name
  image files; uploads (data, evaluation prompts, chat images) are at most
  ``HSR_MAX_UPLOAD_MB`` (default 10) megabytes, refused by gradio at the upload
  (``max_file_size``) and checked again by the handlers;
- pushes to the hub only with a token of their own, never with the Space's ``HF_TOKEN``;
- has per-session state that is forgotten ``HSR_SESSION_TTL_S`` seconds (default 3600) after
  its last change and when the browser tab closes, and waits in a queue of at most
  ``HSR_QUEUE_SIZE`` (default 20) requests.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsr_core import pipeline
from hsr_core.config import ModelSpec

DEFAULT_MODEL = "builtin:smollm2-135m-safe"
"""The model the app offers first, and the one public mode serves unless ``HSR_MODEL`` says."""

BUILTIN_MODELS = tuple(f"builtin:{n}" for n in pipeline.builtin_names())

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""``org/name`` as the hub writes repository ids (no ``..``: checked apart)."""

MB = 1_000_000


class Refused(Exception):
    """Something public mode does not allow; the message says what is allowed instead."""


def _flag(env: Mapping[str, str]) -> bool:
    value = env.get("HSR_PUBLIC", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    if value:
        raise ValueError(f"HSR_PUBLIC must be 1 or 0, got {env['HSR_PUBLIC']!r}")
    return bool(env.get("SPACE_ID", "").strip())


def _names(env: Mapping[str, str], key: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n.strip() for n in env.get(key, "").split(",") if n.strip()))


def _number(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(key, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{key} must be a number, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{key} must be above 0, got {raw!r}")
    return value


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a hub repository id ``org/name`` (never a path)."""
    return bool(HUB_ID.match(name)) and ".." not in name


@dataclass(frozen=True)
class Policy:
    """What a visitor may do (public mode) or everything (local use); see the module docstring.

    Attributes:
        public: public mode is on.
        model: the model served to every visitor in public mode.
        models: the allow-list ``model`` must be on (built-in models, then ``HSR_MODELS``).
        datasets: hub datasets a visitor may load as calibration data.
        max_upload_mb: the largest upload, in megabytes (10^6 bytes).
        session_ttl_s: a session's state is forgotten this long after its last change.
        queue_size: the most requests waiting in the queue.
    """

    public: bool = False
    model: str = DEFAULT_MODEL
    models: tuple[str, ...] = BUILTIN_MODELS
    datasets: tuple[str, ...] = ()
    max_upload_mb: float = 10.0
    session_ttl_s: float = 3600.0
    queue_size: int = 20

    def __post_init__(self) -> None:
        if not self.public:
            return
        for name in self.models:
            if not (name in BUILTIN_MODELS or is_hub_id(name)):
                raise ValueError(
                    f"HSR_MODELS may name hub ids (org/name) and built-in models "
                    f"({', '.join(BUILTIN_MODELS)}), got {name!r}: public mode never loads a "
                    "local path"
                )
        if self.model not in self.models:
            raise ValueError(
                f"HSR_MODEL={self.model!r} is not on the allow-list ({', '.join(self.models)}); "
                "add it to HSR_MODELS"
            )
        bad = [d for d in self.datasets if not is_hub_id(d)]
        if bad:
            raise ValueError(f"HSR_DATASETS may name hub dataset ids (org/name) only, got {bad}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Policy:
        """The policy the environment asks for (``os.environ`` when ``env`` is None).

        Raises:
            ValueError: a variable that cannot be read, or an ``HSR_MODEL`` off the allow-list
                (in public mode: the app does not start with a policy it cannot keep).
        """
        env = os.environ if env is None else env
        public = _flag(env)
        if not public:
            return cls()
        return cls(
            public=True,
            model=env.get("HSR_MODEL", "").strip() or DEFAULT_MODEL,
            models=tuple(dict.fromkeys(BUILTIN_MODELS + _names(env, "HSR_MODELS"))),
            datasets=_names(env, "HSR_DATASETS"),
            max_upload_mb=_number(env, "HSR_MAX_UPLOAD_MB", 10.0),
            session_ttl_s=_number(env, "HSR_SESSION_TTL_S", 3600.0),
            queue_size=int(_number(env, "HSR_QUEUE_SIZE", 20)),
        )

    # -- what the page shows ---------------------------------------------------------------

    @property
    def served(self) -> ModelSpec:
        """The model every visitor uses (public mode)."""
        return ModelSpec(name=self.model)

    @property
    def image_paths(self) -> bool:
        """Whether data rows may name image files on this machine (not in public mode)."""
        return not self.public

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    def model_choices(self, presets: list[str]) -> list[str]:
        """The model box's choices: the presets, or in public mode only the served model."""
        return [self.model] if self.public else presets

    def data_sources(self, sources: Sequence[str]) -> list[str]:
        """The data box's sources: all, or in public mode those that read no server file."""
        if not self.public:
            return list(sources)
        return [
            s for s in sources if s != "VLGuard folder" and (s != "hub dataset" or self.datasets)
        ]

    # -- refusals --------------------------------------------------------------------------

    def check_model(self, spec: ModelSpec) -> None:
        """Refuse, in public mode, every model but the served one (and other dtype / device).

        Raises:
            Refused: another allowed model (only the operator changes it), a name off the
                allow-list, a local path, or another dtype or device.
        """
        if not self.public:
            return
        name, served = spec.name.strip(), self.model
        if name == served:
            if (spec.dtype, spec.device) != (self.served.dtype, self.served.device):
                raise Refused(
                    f"This public app runs {served} with dtype {self.served.dtype} and device "
                    f"{self.served.device} for every visitor; load it with those."
                )
            return
        if name in self.models:
            raise Refused(
                f"This public app serves {served} to every visitor, and only its operator "
                f"changes that (HSR_MODEL), so a visitor cannot switch it to {name} under "
                f"everyone else's results. Load {served}, or run the app yourself to use {name}."
            )
        if name.startswith("builtin:") or is_hub_id(name):
            raise Refused(
                f"{name} is not on this public app's allow-list ({', '.join(self.models)}); "
                f"it serves {served}."
            )
        raise Refused(
            f"{name!r} is not a model this public app may load: it never opens files or "
            f"folders of its server (local paths are refused). It serves {served}."
        )

    def check_upload(self, path: str | Path | None, what: str) -> str | None:
        """``path`` unchanged, after checking an upload's size (public mode).

        Raises:
            Refused: the file is larger than ``max_upload_mb``.
        """
        if not self.public or path is None:
            return None if path is None else str(path)
        size = Path(path).stat().st_size
        if size > self.max_upload_bytes:
            raise Refused(
                f"The {what} is {size / MB:,.1f} MB; this public app accepts uploads of at "
                f"most {self.max_upload_mb:g} MB."
            )
        return str(path)

    def check_data(self, source: str, location: str, upload: str | None) -> None:
        """Refuse, in public mode, data that would be read from the server's disk or from a
        hub dataset off the allow-list; check an upload's size.

        Raises:
            Refused: a VLGuard folder, a file path, a hub dataset off ``datasets``, an upload
                that is too large.
        """
        if not self.public:
            return
        location = (location or "").strip()
        allowed = ", ".join(self.datasets) or "none"
        instead = (
            "Use the built-in data, upload a JSONL / JSON / CSV file, or load a hub dataset "
            f"this app allows ({allowed})."
        )
        if source == "VLGuard folder":
            raise Refused(f"A VLGuard folder is a folder on the server: {instead}")
        if source == "hub dataset" and location and location not in self.datasets:
            raise Refused(f"The hub dataset {location} is not on this app's allow-list. {instead}")
        if source == "file":
            if upload is None and location:
                raise Refused(
                    f"{location!r} names a file on the server, which this public app never "
                    f"reads. {instead}"
                )
            self.check_upload(upload, "uploaded data file")

    def check_push_token(self, token: str) -> None:
        """Refuse, in public mode, a push to the hub without the visitor's own token.

        Raises:
            Refused: no token (the push would use the Space's own credentials).
        """
        if self.public and not (token or "").strip():
            raise Refused(
                "Give your own Hugging Face write token (https://huggingface.co/settings/tokens): "
                "this public app never pushes with its own credentials."
            )

    # -- gradio's settings -----------------------------------------------------------------

    def state_options(self, delete_callback: Callable[[Any], None] | None = None) -> dict:
        """``gr.State`` keywords: a time-to-live (and what to do when the value goes) in public
        mode; none locally (gradio's defaults: kept while the session lives)."""
        if not self.public:
            return {}
        out: dict[str, Any] = {"time_to_live": self.session_ttl_s}
        if delete_callback is not None:
            out["delete_callback"] = delete_callback
        return out

    def blocks_options(self) -> dict:
        """``gr.Blocks`` keywords: in public mode, uploads and files made for download are
        deleted ``session_ttl_s`` after they were made (checked every 10 minutes)."""
        if not self.public:
            return {}
        return {"delete_cache": (600, int(self.session_ttl_s))}

    def queue_options(self) -> dict | None:
        """``Blocks.queue`` keywords in public mode (a bounded queue); None locally."""
        return {"max_size": self.queue_size} if self.public else None

    def launch_options(self) -> dict:
        """``Blocks.launch`` keywords: the upload limit in public mode; none locally."""
        return {"max_file_size": self.max_upload_bytes} if self.public else {}


POLICY = Policy.from_env()
"""The process's policy, read once at start-up (modules read ``public.POLICY`` when they act,
so a test can put another in its place)."""
