"""Frozen, self-checking configuration for each HSR step.

One dataclass per step (Ships attribution, Wanda calibration and pruning, HSR realignment,
evaluation, chat generation), the model spec, and ``RunConfig`` for a whole run; plus the
parsers of the two settings written as text (an N:M pattern, a column mapping), shared by the
command line and the app. Every field is validated in ``__post_init__`` so that a bad
combination fails at construction, with a message that says what to change, instead of deep
inside a tensor operation. Defaults are the reference's (docs/METHOD.md).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

DTYPES = ("auto", "float32", "bfloat16", "float16")
SCOPES = ("heads", "heads+mlp")
"""HSR restore scopes: ``heads`` is the paper's; ``heads+mlp`` is this project's extension."""
DEVICES = ("auto", "cpu", "cuda", "mps")
RANKINGS = ("wanda", "snip")
"""The scores the HSR restore set can rank by: Wanda's (the paper's) or SNIP's (Wei et al.)."""
PRUNERS = ("wanda", "sparsegpt", "snip", "magnitude")
"""Base pruners (docs/METHOD.md): Wanda (the default), SparseGPT, SNIP, magnitude."""
PRUNER_LABELS = {
    "wanda": "Wanda",
    "sparsegpt": "SparseGPT",
    "snip": "SNIP",
    "magnitude": "magnitude",
}
"""How a pruner's name is written in titles (chat columns, the model card, tables)."""
PRUNER_MODES = {
    "wanda": ("one-shot", "sequential"),
    "sparsegpt": ("sequential",),
    "snip": ("sequential", "one-shot"),
}
"""The modes each pruner has, its default first: SparseGPT is sequential (its reference); SNIP
sequential as Wei et al.'s ``prune_wandg`` prunes, or one-shot from the dense model's
gradients; a pruner not listed (magnitude, ``|W|``) has only ``one-shot``."""


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent with another one."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def cuda_group(device: str) -> tuple[int, ...] | None:
    """The GPU indices of a device written ``cuda:N`` or ``cuda:N,M,...`` (a ``device_map``
    group: the model spread over those GPUs, ``hsr_core.models.placement``); None for any
    other device (``cuda`` alone included).

    Raises:
        ConfigError: an index that is not a number, or one given twice.
    """
    if not device.startswith("cuda:"):
        return None
    parts = device[len("cuda:") :].split(",")
    _check(
        all(p.isdigit() for p in parts),
        f"device must be cuda:N or cuda:N,M,... (GPU indices), got {device!r}",
    )
    group = tuple(int(p) for p in parts)
    _check(len(set(group)) == len(group), f"device {device!r} names a GPU twice")
    return group


def _fraction(name: str, value: float, *, upper_inclusive: bool = True) -> None:
    hi_ok = value <= 1.0 if upper_inclusive else value < 1.0
    _check(
        value >= 0.0 and hi_ok,
        f"{name} must be a fraction in [0, {'1]' if upper_inclusive else '1)'}, got {value!r}"
        " (fractions, not percents: 0.5 means 50%)",
    )


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and where.

    Attributes:
        name: a Hugging Face hub id, a local folder, or ``builtin:<name>``.
        revision: hub revision (branch, tag or commit); ignored for folders.
        dtype: weight dtype; ``auto`` takes bfloat16 on a GPU and float32 on the CPU.
        device: ``auto`` (a GPU when there is one), ``cpu``, ``cuda`` (every visible GPU),
            ``cuda:N``, ``cuda:N,M,...`` (the model spread over those GPUs) or ``mps``.
        trust_remote_code: let transformers run code from the checkpoint's repository.
    """

    name: str
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _check(bool(self.name and self.name.strip()), "model name is empty")
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check(
            self.device in DEVICES or self.device.startswith("cuda:"),
            f"device must be one of {DEVICES}, cuda:N or cuda:N,M,..., got {self.device!r}",
        )
        cuda_group(self.device)  # the indices of cuda:N[,M...]


@dataclass(frozen=True)
class ShipsConfig:
    """Ships head attribution (docs/METHOD.md, "Ships").

    Attributes:
        num_samples: how many harmful probe prompts to use.
        ablation: ``zero`` removes the head's output; ``uniform`` replaces it with the causal
            running mean of its values (undifferentiated attention).
        metric: ``angle`` is dataset-level Ships (principal angles of the left singular
            vectors); ``kl`` is per-prompt KL of the next-token distribution, averaged.
        r_main: how many leading singular directions the angle sums over.
        batch_size: ablated copies of a prompt run side by side in one replay batch.
        seed: picks which probe prompts are used when there are more than ``num_samples``.
        mode: ``exact`` ablates every head (the paper's Ships); ``screen`` (our extension, not
            in the paper) scores every head by a first-order estimate from one backward pass
            per prompt, then runs exact Ships on the ``candidates x top_h`` best only.
        candidates: ``c`` of ``screen`` mode: exact Ships re-scores ``c x top_h`` heads.
    """

    num_samples: int = 128
    ablation: Literal["zero", "uniform"] = "zero"
    metric: Literal["angle", "kl"] = "angle"
    r_main: int = 1
    batch_size: int = 16
    seed: int = 0
    mode: Literal["exact", "screen"] = "exact"
    candidates: int = 3

    def __post_init__(self) -> None:
        _check(self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}")
        _check(self.mode in ("exact", "screen"), f"unknown Ships mode {self.mode!r}")
        _check(self.candidates >= 1, f"candidates must be >= 1, got {self.candidates}")
        _check(self.ablation in ("zero", "uniform"), f"unknown ablation {self.ablation!r}")
        _check(self.metric in ("angle", "kl"), f"unknown Ships metric {self.metric!r}")
        _check(self.r_main >= 1, f"r_main must be >= 1, got {self.r_main}")
        _check(
            self.metric != "angle" or self.r_main <= self.num_samples,
            f"r_main ({self.r_main}) cannot exceed the number of probe prompts "
            f"({self.num_samples}): there are only that many singular directions",
        )
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class WandaConfig:
    """Pruning: the Wanda statistics (always taken: HSR ranks by them) and the masks of the
    chosen base pruner (docs/METHOD.md, "Wanda", "SparseGPT", "SNIP and magnitude").

    Attributes:
        pruner: ``wanda`` (``|W| * ||X||`` per row), ``sparsegpt`` (Hessian-based selection
            with the optimal update of the kept weights), ``snip`` (``|W * dL/dW|`` per row) or
            ``magnitude`` (``|W|`` per row).
        sparsity: fraction of each row's weights pruned (unstructured).
        structure: ``unstructured`` or ``n:m`` (``n`` of every ``m`` consecutive inputs pruned).
        n, m: the N:M pattern, e.g. 2:4.
        mode: ``one-shot`` takes all statistics from the dense model; ``sequential`` prunes
            layer by layer, each layer's statistics taken after the earlier layers are pruned
            (Wanda and SNIP have both; SparseGPT is sequential, as its reference; magnitude
            one-shot). ``None``: the pruner's own default (``PRUNER_MODES``, first entry).
        tokens: ``response`` counts only the answer tokens of each sample; ``all`` every token.
        num_samples: calibration samples per set (safety and utility).
        batch_size: calibration samples per forward pass.
        seed: which samples are drawn when a set has more than ``num_samples``.
    """

    sparsity: float = 0.5
    pruner: Literal["wanda", "sparsegpt", "snip", "magnitude"] = "wanda"
    structure: Literal["unstructured", "n:m"] = "unstructured"
    n: int = 2
    m: int = 4
    mode: Literal["one-shot", "sequential"] | None = None
    tokens: Literal["response", "all"] = "response"
    num_samples: int = 128
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.pruner in PRUNERS, f"unknown pruner {self.pruner!r}; choose from {PRUNERS}")
        modes = PRUNER_MODES.get(self.pruner, ("one-shot",))
        if self.mode is None:
            object.__setattr__(self, "mode", modes[0])
        _check(
            self.mode in ("one-shot", "sequential"),
            f"unknown mode {self.mode!r}; choose one-shot or sequential",
        )
        _check(
            self.mode in modes,
            f"{self.pruner} has no {self.mode} mode; it has {' and '.join(modes)}",
        )
        _fraction("sparsity", self.sparsity, upper_inclusive=False)
        _check(self.structure in ("unstructured", "n:m"), f"unknown structure {self.structure!r}")
        if self.structure == "n:m":
            _check(
                1 <= self.n < self.m,
                f"N:M pattern needs 1 <= N < M, got {self.n}:{self.m}",
            )
        _check(self.tokens in ("response", "all"), f"unknown token selection {self.tokens!r}")
        _check(self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def target_sparsity(self) -> float:
        """The fraction of weights the mask prunes (N/M for semi-structured masks)."""
        return self.n / self.m if self.structure == "n:m" else self.sparsity

    def stats_key(self) -> dict[str, Any]:
        """The fields that change the norm statistics (one-shot), for cache keys."""
        return {"tokens": self.tokens, "num_samples": self.num_samples, "seed": self.seed}


@dataclass(frozen=True)
class RealignConfig:
    """HSR restore set (docs/METHOD.md, "HSR").

    Attributes:
        p: utility ranks above the top ``p`` fraction are never restored.
        q: only the top ``q`` fraction by safety score can be restored.
        max_p: only weights within the top ``max_p`` fraction by utility can be restored.
        top_h: how many of the highest-scoring Ships heads are realigned.
        slicing: ``head`` restores only the head's own weights (the paper's reading);
            ``reference`` reproduces the released code's slicing.
        scope: ``heads`` (the paper): only the selected heads' attention weights;
            ``heads+mlp`` (our extension, not in the paper): also the same band R in the MLP
            projections of the layers that hold the selected heads.
        ranking: the safety and utility scores ``R(p, q, max_p)`` ranks by: ``wanda``
            (``|W| * ||X||``, the paper's, for every pruner) or ``snip`` (``|W * dL/dW|`` on
            the safety and the utility set, as Wei et al. rank with SNIP).
    """

    p: float = 0.5
    q: float = 0.5
    max_p: float = 0.7
    top_h: int = 10
    slicing: Literal["head", "reference"] = "head"
    scope: Literal["heads", "heads+mlp"] = "heads"
    ranking: Literal["wanda", "snip"] = "wanda"

    def __post_init__(self) -> None:
        _check(
            self.ranking in RANKINGS,
            f"unknown ranking {self.ranking!r}; choose one of {', '.join(RANKINGS)}",
        )
        _fraction("p", self.p)
        _fraction("q", self.q)
        _fraction("max_p", self.max_p)
        _check(
            self.p <= self.max_p,
            f"p ({self.p}) must not exceed max_p ({self.max_p}): restore candidates have a "
            "utility rank between the top p and the top max_p fractions, so p > max_p "
            "selects nothing. Lower p or raise max_p.",
        )
        _check(self.top_h >= 1, f"top_h must be >= 1, got {self.top_h}")
        _check(self.slicing in ("head", "reference"), f"unknown slicing {self.slicing!r}")
        _check(
            self.scope in SCOPES,
            f"unknown restore scope {self.scope!r}; choose one of {', '.join(SCOPES)}",
        )

    def check_heads(self, num_layers: int, num_heads: int) -> None:
        """Raise when ``top_h`` exceeds the model's ``num_layers * num_heads`` heads."""
        total = num_layers * num_heads
        _check(
            self.top_h <= total,
            f"top_h ({self.top_h}) exceeds the model's {total} attention heads "
            f"({num_layers} layers x {num_heads} heads)",
        )


JUDGES = ("reference", "keyword", "model")
"""Refusal judges (``hsr_core.judges``): the paper's rule, this project's keywords, a judge model."""
REFERENCE_MAX_NEW_TOKENS = 256
"""The reference evaluation's new-token budget (alignment-attribution-code lib/eval.py)."""
MAX_NEW_TOKENS = 64
"""The new-token budget of the keyword and model judges unless one is given."""


def default_max_new_tokens(judge: str) -> int:
    """The new-token budget an evaluation with ``judge`` uses unless one is given: the
    reference's 256 for ``reference``, 64 otherwise."""
    return REFERENCE_MAX_NEW_TOKENS if judge == "reference" else MAX_NEW_TOKENS


@dataclass(frozen=True)
class EvalConfig:
    """Generation, judging and interval settings for evaluation (docs/METHOD.md, "Evaluation").

    Attributes:
        max_new_tokens: tokens generated per answer (``default_max_new_tokens``: 256 for the
            reference judge, 64 otherwise, where a caller does not choose).
        batch_size: prompts generated together (left-padded).
        min_words: the keyword judge counts answers with fewer words as refusals (the
            reference judge's minimum is fixed at 20 space-separated words).
        judge: ``reference`` (the paper's rule), ``keyword`` (this project's) or ``model`` (a
            judge model, given to the evaluation).
        bootstrap_resamples: resamples of the paired bootstrap interval on RSR.
        bootstrap_seed: the bootstrap's seed.
        lm_eval: lm-evaluation-harness tasks run on each variant (none by default).
        lm_eval_limit: examples per lm-eval task (None: all).
    """

    max_new_tokens: int = MAX_NEW_TOKENS
    batch_size: int = 8
    min_words: int = 5
    judge: Literal["reference", "keyword", "model"] = "keyword"
    bootstrap_resamples: int = 2000
    bootstrap_seed: int = 0
    lm_eval: tuple[str, ...] = ()
    lm_eval_limit: int | None = None

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.min_words >= 0, "min_words must be >= 0")
        _check(self.judge in JUDGES, f"unknown judge {self.judge!r}; choose one of {JUDGES}")
        _check(self.bootstrap_resamples >= 1, "bootstrap_resamples must be >= 1")
        if isinstance(self.lm_eval, str):
            object.__setattr__(self, "lm_eval", parse_tasks(self.lm_eval))
        elif isinstance(self.lm_eval, list):  # read back from eval.json
            object.__setattr__(self, "lm_eval", tuple(self.lm_eval))
        _check(
            self.lm_eval_limit is None or self.lm_eval_limit >= 1,
            f"lm_eval_limit must be >= 1, got {self.lm_eval_limit}",
        )


def parse_tasks(text: str | None) -> tuple[str, ...]:
    """``"arc_easy,hellaswag"`` -> ``("arc_easy", "hellaswag")`` (commas or spaces)."""
    return tuple(t for t in (text or "").replace(",", " ").split() if t)


RUNGS = (
    "dense",
    "dense_ablated",
    "pruned",
    "hsr",
    "random_heads",
    "top_heads",
    "attention",
    "mlp",
)
"""The rungs of the localization ladder (``hsr_core.localize``), in the order they are shown."""


@dataclass(frozen=True)
class LocalizeConfig:
    """The localization ladder: where the safety a pruned model lost can be won back.

    Attributes:
        top_k: heads of the head rungs (top-k Ships heads, k random heads, the ablated heads);
            None: the realignment's ``top_h``.
        seeds: how many random-head draws (the spread of the chance control).
        seed: the first draw's seed (draw ``i`` uses ``seed + i``).
        rungs: which rungs to run (all by default, in ``RUNGS`` order).
    """

    top_k: int | None = None
    seeds: int = 3
    seed: int = 0
    rungs: tuple[str, ...] = RUNGS

    def __post_init__(self) -> None:
        _check(self.top_k is None or self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        _check(self.seeds >= 1, f"seeds must be >= 1, got {self.seeds}")
        unknown = [r for r in self.rungs if r not in RUNGS]
        _check(not unknown, f"unknown rungs {unknown}; choose from {', '.join(RUNGS)}")
        _check(bool(self.rungs), "choose at least one rung")


@dataclass(frozen=True)
class GenerationSettings:
    """Per-conversation chat generation settings.

    Attributes:
        system_prompt: an optional system message.
        max_new_tokens: reply length limit.
        temperature: 0 means greedy decoding.
        top_p: nucleus sampling mass (with temperature > 0).
        seed: set before every reply, the same for every variant.
    """

    system_prompt: str = ""
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check(
            1 <= self.max_new_tokens <= 8192,
            f"max_new_tokens must be between 1 and 8192, got {self.max_new_tokens}",
        )
        _check(
            0.0 <= self.temperature <= 5.0,
            f"temperature must be between 0 and 5, got {self.temperature}",
        )
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs (the command line's arguments, or an app session's settings).

    Attributes:
        model: the model.
        data: the calibration data source (``builtin``, ``vlguard:DIR``, a file, a hub id).
        columns: column mapping for files and hub datasets, ``((field, column), ...)``.
        utility_data: a separate source for the utility set.
        ships, wanda, realign, eval: the steps' settings.
        heads_file: a ``heads.jsonl`` to use instead of running Ships.
    """

    model: ModelSpec
    data: str = "builtin"
    columns: tuple[tuple[str, str], ...] = ()
    utility_data: str | None = None
    ships: ShipsConfig = dataclasses.field(default_factory=ShipsConfig)
    wanda: WandaConfig = dataclasses.field(default_factory=WandaConfig)
    realign: RealignConfig = dataclasses.field(default_factory=RealignConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    heads_file: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.columns, dict):  # accept a mapping; keep a hashable tuple
            object.__setattr__(self, "columns", tuple(self.columns.items()))

    def column_map(self) -> dict[str, str] | None:
        """The column mapping as a dict (None when there is none)."""
        return dict(self.columns) or None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": to_dict(self.model),
            "data": self.data,
            "columns": self.column_map(),
            "utility_data": self.utility_data,
            "ships": to_dict(self.ships),
            "wanda": to_dict(self.wanda),
            "realign": to_dict(self.realign),
            "eval": to_dict(self.eval),
        }

    def key(self) -> str:
        return fingerprint(self.to_dict())


STRUCTURES = ("unstructured", "2:4", "4:8")
"""The N:M patterns offered by the app (any N:M is accepted)."""


def parse_structure(text: str) -> dict[str, Any]:
    """``"unstructured"`` or ``"N:M"`` -> the ``WandaConfig`` fields that say so.

    Raises:
        ConfigError: anything else, with an example.
    """
    text = (text or "").strip()
    if text == "unstructured":
        return {"structure": "unstructured"}
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(
            f"structure must be 'unstructured' or N:M like 2:4, got {text!r}"
        ) from None
    return {"structure": "n:m", "n": n, "m": m}


def parse_columns(text: str | None) -> tuple[tuple[str, str], ...]:
    """``"prompt=instruction,response=output"`` -> ``(("prompt", "instruction"), ...)``.

    Commas or semicolons separate the pairs; spaces around names are ignored; empty text is no
    mapping.

    Raises:
        ConfigError: a part that is not ``field=column``.
    """
    pairs = []
    for part in (text or "").replace(";", ",").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(
                f"column mapping {text!r}: write it as field=column pairs separated by commas, "
                "e.g. prompt=instruction,response=output,harmful=unsafe"
            )
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def fingerprint(obj: Any) -> str:
    """Canonical JSON of a config (or dict of configs), used inside cache keys."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
