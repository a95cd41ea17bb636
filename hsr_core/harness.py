"""lm-evaluation-harness tasks on a loaded model, in place (docs/METHOD.md, "Evaluation").

The community's utility benchmarks (``arc_easy``, ``hellaswag``, ``mmlu``...) run through
EleutherAI's lm-evaluation-harness on the weights the variants hold *now*: its ``HFLM`` wrapper
takes the loaded model and tokenizer (``HFLM(pretrained=model, tokenizer=tokenizer)``), so
nothing is exported or reloaded. ``lm_eval`` is an optional extra (``pip install -r
requirements-lm-eval.txt``); without it ``run_lm_eval`` raises ``LmEvalMissing`` saying so.
Hub tasks need their data sets (the hub, or its cache); a task written as a YAML file with a
local ``dataset_path`` runs offline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .models import LoadedModel


class LmEvalMissing(RuntimeError):
    """lm-evaluation-harness is not installed."""


class LmEvalError(RuntimeError):
    """A task could not be loaded or run (unknown name, data set unreachable offline...)."""


INSTALL_HINT = (
    "--lm-eval needs lm-evaluation-harness, an optional extra: pip install -r "
    "requirements-lm-eval.txt (or pip install lm_eval)"
)


def _task_names(tasks: Sequence[str]) -> tuple[list[str], list[str]]:
    """Task names and the folders to search for the ones given as YAML files."""
    import yaml

    names, include = [], []
    for t in tasks:
        path = Path(t).expanduser()
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise LmEvalError(f"lm-eval task file {t} not found")
            cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            if "task" not in cfg:
                raise LmEvalError(f"lm-eval task file {t} has no 'task:' name")
            names.append(str(cfg["task"]))
            include.append(str(path.resolve().parent))
        else:
            names.append(t)
    return names, sorted(set(include))


def run_lm_eval(
    loaded: LoadedModel,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Run lm-evaluation-harness ``tasks`` on the model as it is now.

    Args:
        loaded: the model (its current weights: a variant inside ``Variants.use``).
        tasks: harness task names, or paths of task YAML files.
        limit: examples per task (None: all).
        batch_size: the harness's batch size.
        seed: the harness's random, numpy, torch and few-shot seeds.

    Returns:
        ``{task: {metric: value}}`` as the harness reports them (e.g. ``"acc,none"`` and its
        ``"acc_stderr,none"``).

    Raises:
        LmEvalMissing: lm_eval is not installed.
        LmEvalError: a task is unknown or could not run.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise LmEvalMissing(INSTALL_HINT) from e
    names, include = _task_names(tasks)
    model = loaded.model
    was_training = model.training
    lm = HFLM(
        pretrained=model,
        tokenizer=loaded.tokenizer,
        batch_size=batch_size,
        device=str(loaded.device),
    )
    try:
        manager = TaskManager(include_path=include or None, verbosity="ERROR")
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=1000,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            verbosity="ERROR",
        )
    except LmEvalError:
        raise
    except Exception as e:  # the harness raises many kinds (KeyError, ValueError, hub errors)
        raise LmEvalError(
            f"lm-eval tasks {', '.join(names)} could not run: {type(e).__name__}: {e}. Check "
            "the task names (lm_eval --tasks list) and that their data sets are reachable or "
            "cached; a task YAML with a local dataset_path runs offline."
        ) from e
    finally:
        model.train(was_training)
    if not out or "results" not in out:
        raise LmEvalError(f"lm-eval returned no results for {', '.join(names)}")
    results: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        results[task] = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "alias"
        }
        results[task] = {k: (v if math.isfinite(v) else math.nan) for k, v in results[task].items()}
    return results
