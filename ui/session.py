"""The small state of each browser session, and what the tabs say about it.

``Session`` is what one browser tab owns, kept in ``gr.State``: its configs, its Ships scores
``[L, H]``, the key of its norm vectors, its masks (packed, 1/8 byte per weight) and its restore
set. It is frozen: a handler builds a new one with ``dataclasses.replace`` and returns it only
when the step succeeded, so a failing step leaves the earlier results in place. The shared model
the results belong to lives in ``ui.workbench``.

The functions here describe a session for every tab alike: the status line, the settings that
define each variant (chat column titles, exports, evaluation records), and the key that tells
whether an evaluation was made with the session's current variants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hsr_core import pipeline
from hsr_core.config import RealignConfig, ShipsConfig, WandaConfig, fingerprint


class SessionError(RuntimeError):
    """A step was asked for before the steps it needs (the message says which)."""


@dataclass(frozen=True)
class DataSpec:
    """Where a session's calibration data comes from (enough to load it again).

    Attributes:
        source: ``builtin``, a VLGuard folder, a file path or a hub dataset id.
        columns: column mapping for files and hub datasets.
        label: how the UI names it.
        image_paths: rows may name image files on this machine (not in public mode).
    """

    source: str = "builtin"
    columns: tuple[tuple[str, str], ...] = ()
    label: str = "built-in"
    image_paths: bool = True

    @property
    def key(self) -> str:
        return fingerprint({"source": self.source, "columns": list(self.columns)})

    def column_map(self) -> dict[str, str] | None:
        return dict(self.columns) or None


@dataclass(frozen=True)
class Session:
    """One browser session's results (small; lives in ``gr.State``).

    Attributes:
        model: ``Workbench.model_key`` of the model these results belong to.
        model_name: the model's name, for messages.
        data: the calibration data spec.
        ships: the Ships config of ``scores``.
        scores: Ships scores ``[num_layers, num_heads]`` (a float32 CPU tensor).
        wanda: the Wanda config of ``norms_key`` and ``masks``.
        norms_key: key of the safety/utility norm vectors in the workbench.
        masks: the pruning masks (True = pruned).
        updated: SparseGPT's updated values of the weights it kept (None for other pruners).
        sparsity: ``sparsity_report`` of the masks.
        realign: the settings of ``restore``.
        restore: the restore set shown in the Realign tab.
        head: the head shown in detail.
    """

    model: str | None = None
    model_name: str = ""
    data: DataSpec = field(default_factory=DataSpec)
    ships: ShipsConfig | None = None
    scores: Any = None
    wanda: WandaConfig | None = None
    norms_key: str | None = None
    masks: pipeline.Masks | None = None
    updated: pipeline.UpdatedWeights | None = None
    sparsity: dict[str, Any] | None = None
    realign: RealignConfig | None = None
    restore: pipeline.RestoreSet | None = None
    head: pipeline.Head | None = None


# ---------------------------------------------------------------------------------------------
# what the tabs say about a session


def _n(x: int) -> str:
    return f"{x:,}"


def status_line(state: Session) -> str:
    """One line: what this tab has done so far."""
    if state.model is None:
        return "**No model yet.** Load one in *Model & data*."
    parts = [f"**Model** `{state.model_name}`", f"**data** {state.data.label}"]
    if state.scores is not None:
        parts.append(f"**Ships** {state.ships.num_samples} prompts, {state.ships.metric}")
    if state.sparsity is not None:
        parts.append(f"**pruned** {100 * state.sparsity['sparsity']:.1f}%")
    if state.restore is not None:
        parts.append(
            f"**restored** {_n(state.restore.count)} ({state.restore.per_10k_pruned:.3f} ‱)"
        )
    return " · ".join(parts)


def variant_settings(state: Session, variant: str) -> dict[str, Any] | None:
    """What defines ``variant`` in this session now (None when it does not exist yet)."""
    if variant == "original":
        return {"weights": "dense"}
    if state.masks is None or state.wanda is None:
        return None
    w = state.wanda
    pruned = {
        "sparsity": w.sparsity if w.structure == "unstructured" else w.target_sparsity,
        "structure": "unstructured" if w.structure == "unstructured" else f"{w.n}:{w.m}",
        "pruner": w.pruner,
        "mode": w.mode,
        "calib_samples": w.num_samples,
        "achieved_sparsity": (state.sparsity or {}).get("sparsity"),
        "pruned_weights": (state.sparsity or {}).get("pruned_weights"),
    }
    if variant == "pruned":
        return pruned
    if state.restore is None or state.realign is None:
        return None
    r, rs = state.realign, state.restore
    return {
        **pruned,
        "p": r.p,
        "q": r.q,
        "max_p": r.max_p,
        "top_h": r.top_h,
        "slicing": r.slicing,
        "scope": r.scope,
        "restored": rs.count,
        "restored_per_10k_pruned": round(rs.per_10k_pruned, 4),
        "selected_heads": [h.label for h in rs.heads],
    }


def settings_key(state: Session) -> str:
    """What an evaluation's variants depend on: model, data, Ships, Wanda and HSR settings."""
    return fingerprint(
        {
            "model": state.model,
            "data": state.data.key,
            "ships": state.ships,
            "wanda": state.wanda,
            "realign": state.realign,
            "restored": state.restore.count if state.restore is not None else None,
        }
    )


def matching_evaluation(state: Session, record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The session's evaluation result when it was made with the session's current variants."""
    if record and record.get("key") == settings_key(state):
        return record["result"]
    return None


def restore_summary(rs: pipeline.RestoreSet) -> dict[str, Any]:
    """A restore set's accounting as JSON (the Realign tab's JSON and the session summary)."""
    s = rs.summary()
    return {
        "selected_heads": s["selected_heads"],
        "restored": s["restored"],
        "restored_per_10k_pruned": s["restored_per_10k_pruned"],
        "restore_candidates_in_heads": s["restore_candidates_in_heads"],
        "restored_per_module": s["restored_per_module"],
        "restored_per_head": s["restored_per_head"],
        "pruned_weights": rs.pruned_total,
        **{
            k: v
            for k, v in s.items()
            if k.startswith(("restore_scope", "restored_mlp", "restore_candidates_in_mlp"))
        },
    }
