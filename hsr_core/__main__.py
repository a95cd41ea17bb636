"""The command line: ``python -m hsr_core <command> --model M --data D --out DIR``.

Commands run the pipeline up to their step (earlier steps come from the cache when they were
computed before) and write their files into ``--out``:

    attribute  heads.jsonl                     Ships scores of every head
    calibrate  norms.safetensors               safety and utility norm vectors
    prune      summary.json (+ pruned/)        masks (--pruner), achieved sparsity
    realign    summary.json (+ both folders)   HSR restore set and its accounting
    evaluate   eval.json                       refusals, ASR, RSR, perplexity per variant
    localize   localize.json                   the localization ladder (our study): where the
                                               lost safety can be won back
    export     pruned/, realigned/             save_pretrained folders
    run        all of the above
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from .config import (
    JUDGES,
    PRUNER_LABELS,
    PRUNERS,
    RANKINGS,
    RUNGS,
    SCOPES,
    ConfigError,
    EvalConfig,
    LocalizeConfig,
    ModelSpec,
    RealignConfig,
    RunConfig,
    ShipsConfig,
    WandaConfig,
    default_max_new_tokens,
    parse_columns,
    parse_structure,
    parse_tasks,
)

COMMANDS = {
    "attribute": "Ships attribution: score every attention head (writes heads.jsonl).",
    "calibrate": "Wanda statistics: safety and utility norm vectors (writes norms.safetensors).",
    "prune": "Pruning masks (--pruner wanda|sparsegpt|snip|magnitude) and achieved sparsity (writes summary.json; --export: pruned/).",
    "realign": "HSR restore set inside the top heads (writes summary.json; --export: pruned/, realigned/).",
    "evaluate": "Answer the evaluation prompts with each variant (writes eval.json).",
    "export": "Write the pruned and realigned models as save_pretrained folders.",
    "localize": "The localization ladder (HSR Workbench's own study, not the paper's): ASR when "
    "HSR's set, random heads, the top heads, all attention or all MLP weights are put back, and "
    "of the dense model with the top heads ablated (writes localize.json).",
    "grid": "The paper's grid: every base pruner (--pruners), pruned and +HSR, on the same "
    "evaluation prompts: ASR with Wilson intervals, RSR with bootstrap intervals, perplexity, "
    "restored weights (writes grid.json and grid.md).",
    "run": "All steps: heads.jsonl, summary.json, and eval.json / exports when asked.",
}
EXAMPLE = """example:
  python -m hsr_core run --model builtin:tiny-llava-next --data builtin --out out --export
  python -m hsr_core run --model builtin:smollm2-135m-safe --data builtin --sparsity 0.5 \\
      --eval-data builtin --out out/smollm2
"""


def _columns(text: str | None) -> tuple[tuple[str, str], ...]:
    try:
        return parse_columns(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_common(p: argparse.ArgumentParser, command: str) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        required=True,
        help="hub id, local folder, or builtin:NAME (e.g. builtin:smollm2-135m-safe)",
    )
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda (every visible GPU), cuda:N, or cuda:N,M,... (the model spread "
        "over those GPUs)",
    )
    g.add_argument(
        "--gpus-per-process",
        type=int,
        default=None,
        metavar="K",
        help="GPUs each process's model is spread over (a device_map group, for a model larger "
        "than one GPU): under accelerate launch --num_processes N, process r takes GPUs "
        "r*K..r*K+K-1 of the N*K visible; one process takes 0..K-1 (default: one process "
        "every visible GPU, several one GPU each)",
    )
    g.add_argument(
        "--trust-remote-code", action="store_true", help="allow code from the model repository"
    )
    g.add_argument(
        "--data",
        default="builtin",
        help="builtin, a VLGuard folder (vlguard:DIR: the reference's split, unsafe images with "
        "their first pair; vlguard-all:DIR: every pair), a JSON/JSONL/CSV file or a hub dataset id",
    )
    g.add_argument("--utility-data", default=None, help="separate file/dataset for the utility set")
    g.add_argument(
        "--columns",
        type=_columns,
        default=(),
        help="column mapping, e.g. prompt=instruction,response=output,harmful=unsafe",
    )
    g.add_argument("--out", required=True, type=Path, help="output folder")
    g.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache root (default $HSR_CACHE_DIR or ~/.cache/hsr-workbench)",
    )
    g.add_argument("--recompute", action="store_true", help="ignore cached scores and norms")
    g.add_argument("--quiet", action="store_true", help="no progress bars")

    s = p.add_argument_group("Ships attribution")
    s.add_argument(
        "--ships-samples", type=int, default=128, help="harmful probe prompts (default 128)"
    )
    s.add_argument("--ablation", default="zero", choices=["zero", "uniform"])
    s.add_argument(
        "--metric",
        default="angle",
        choices=["angle", "kl"],
        help="dataset-level angle or per-prompt KL",
    )
    s.add_argument("--r-main", type=int, default=1, help="singular directions summed (default 1)")
    s.add_argument("--ships-batch", type=int, default=16, help="ablated copies per batch")
    s.add_argument(
        "--ships-mode",
        default="exact",
        choices=["exact", "screen"],
        help="exact (the paper's) or screen (our extension: every head estimated from one "
        "backward pass per prompt, exact Ships on the best --ships-candidates x top_h only)",
    )
    s.add_argument(
        "--ships-candidates",
        type=int,
        default=3,
        help="screen mode: exact Ships re-scores this many times top_h heads (default 3)",
    )
    s.add_argument(
        "--heads", type=Path, default=None, help="use this heads.jsonl instead of running Ships"
    )

    w = p.add_argument_group("Pruning (the Wanda statistics are always taken: HSR ranks by them)")
    w.add_argument(
        "--pruner",
        default="wanda",
        choices=list(PRUNERS),
        help="base pruner (default wanda); sparsegpt updates the weights it keeps",
    )
    if command == "grid":
        w.add_argument(
            "--pruners",
            default=",".join(PRUNERS),
            help=f"comma-separated pruners of the grid (default all: {','.join(PRUNERS)})",
        )
    w.add_argument(
        "--sparsity", type=float, default=0.5, help="fraction pruned per row (default 0.5)"
    )
    w.add_argument("--structure", default="unstructured", help="unstructured or N:M, e.g. 2:4")
    w.add_argument(
        "--mode",
        default=None,
        choices=["one-shot", "sequential"],
        help="default: the pruner's own (wanda one-shot; sparsegpt sequential, its only mode; "
        "snip sequential, as Wei et al.'s prune_wandg, or one-shot; magnitude one-shot only); "
        "grid: each pruner in this mode where it has it",
    )
    w.add_argument(
        "--tokens",
        default="response",
        choices=["response", "all"],
        help="tokens counted by the statistics",
    )
    w.add_argument(
        "--calib-samples", type=int, default=128, help="samples per calibration set (default 128)"
    )
    w.add_argument("--calib-batch", type=int, default=8)

    r = p.add_argument_group("HSR realignment")
    r.add_argument(
        "--p", type=float, default=0.5, help="utility fraction never restored (default 0.5)"
    )
    r.add_argument(
        "--q", type=float, default=0.5, help="safety fraction that may be restored (default 0.5)"
    )
    r.add_argument(
        "--max-p",
        type=float,
        default=0.7,
        help="utility fraction bound of candidates (default 0.7)",
    )
    r.add_argument(
        "--top-h",
        type=int,
        default=None,
        help="heads realigned (default 10, or every head of a model with fewer)",
    )
    r.add_argument("--slicing", default="head", choices=["head", "reference"])
    r.add_argument(
        "--scope",
        default="heads",
        choices=list(SCOPES),
        help="heads: the paper's (attention heads only); heads+mlp: our extension, also the "
        "same band in the MLPs of the layers holding the selected heads",
    )
    r.add_argument(
        "--ranking",
        default="wanda",
        choices=list(RANKINGS),
        help="scores R(p, q, max_p) ranks by: wanda (|W|*||X||, the paper's, default) or snip "
        "(|W*dL/dW| on the safety and utility sets, as Wei et al.; two gradient passes)",
    )

    lz = p.add_argument_group("localization ladder (localize)")
    lz.add_argument(
        "--ladder-k", type=int, default=None, help="heads of the head rungs (default: top_h)"
    )
    lz.add_argument("--ladder-seeds", type=int, default=3, help="random-head draws (default 3)")
    lz.add_argument(
        "--rungs",
        default=",".join(RUNGS),
        help=f"comma-separated rungs (default all: {','.join(RUNGS)})",
    )

    e = p.add_argument_group("evaluation and export")
    e.add_argument(
        "--eval-data",
        default=None if command not in ("evaluate", "localize", "grid") else "builtin",
        help='builtin or a JSONL of {"prompt", "harmful", "image"?}',
    )
    e.add_argument(
        "--judge",
        default=None,
        choices=list(JUDGES),
        help="refusal judge: reference (the paper's rule: Wei et al.'s 31 case-sensitive "
        "strings or < 20 words, 256 new tokens), keyword (this project's, the default) or model "
        "(--judge-model; the default when one is given)",
    )
    e.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="new tokens per answer (default 256 with --judge reference, as the reference; "
        "64 otherwise)",
    )
    e.add_argument(
        "--lm-eval",
        default="",
        metavar="TASKS",
        help="lm-evaluation-harness tasks run on each variant in place, comma-separated names "
        "or task YAML files (needs the optional lm_eval: pip install -r requirements-lm-eval.txt)",
    )
    e.add_argument(
        "--lm-eval-limit", type=int, default=None, help="examples per lm-eval task (default all)"
    )
    e.add_argument("--eval-batch", type=int, default=8)
    e.add_argument(
        "--judge-model",
        default=None,
        help="optional Llama-Guard-style judge model (hub id or folder) for ASR",
    )
    e.add_argument(
        "--export", action="store_true", help="write pruned/ and realigned/ save_pretrained folders"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hsr_core",
        description="HSR Workbench: Ships head attribution, Wanda pruning and Hierarchical Safety Realignment.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sp = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EXAMPLE,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )
        _add_common(sp, name)
    return parser


def eval_config(args: argparse.Namespace) -> EvalConfig:
    """The evaluation settings: the judge (``model`` when only ``--judge-model`` is given, else
    ``keyword``) and its default new-token budget (256 for ``reference``)."""
    judge = args.judge or ("model" if args.judge_model else "keyword")
    if judge == "model" and not args.judge_model:
        raise ConfigError("--judge model needs a judge model: add --judge-model NAME")
    return EvalConfig(
        max_new_tokens=args.max_new_tokens or default_max_new_tokens(judge),
        batch_size=args.eval_batch,
        judge=judge,
        lm_eval=parse_tasks(args.lm_eval),
        lm_eval_limit=args.lm_eval_limit,
    )


def run_config(args: argparse.Namespace, total_heads: int | None = None) -> RunConfig:
    """The arguments as a ``RunConfig``; ``top_h`` defaults to 10, or to every head of a model
    with fewer (``total_heads``)."""
    top_h = args.top_h or (min(10, total_heads) if total_heads else 10)
    return RunConfig(
        model=ModelSpec(args.model, args.revision, args.dtype, args.device, args.trust_remote_code),
        data=args.data,
        columns=args.columns,
        utility_data=args.utility_data,
        ships=ShipsConfig(
            args.ships_samples,
            args.ablation,
            args.metric,
            args.r_main,
            args.ships_batch,
            mode=args.ships_mode,
            candidates=args.ships_candidates,
        ),
        wanda=WandaConfig(
            sparsity=args.sparsity,
            pruner=args.pruner,
            mode=args.mode,
            tokens=args.tokens,
            num_samples=args.calib_samples,
            batch_size=args.calib_batch,
            **parse_structure(args.structure),
        ),
        realign=RealignConfig(
            args.p, args.q, args.max_p, top_h, args.slicing, args.scope, args.ranking
        ),
        eval=eval_config(args),
        heads_file=str(args.heads) if args.heads else None,
    )


def grid_pruners(args: argparse.Namespace) -> list[str]:
    """``--pruners`` as a list, each checked (exact names, no abbreviations)."""
    names = [x.strip() for x in args.pruners.split(",") if x.strip()]
    bad = [x for x in names if x not in PRUNERS]
    if bad or not names:
        raise ConfigError(
            f"unknown pruner {', '.join(map(repr, bad)) or '(none given)'} in --pruners; "
            f"choose from {', '.join(PRUNERS)}"
        )
    return names


def run_grid_command(
    rank_scores,
    loaded,
    run,
    scores,
    norms,
    utility,
    samples,
    scratch,
    args,
    cache_root,
    log,
    written,
) -> dict[str, Any]:
    """``grid``: every pruner, pruned and +HSR, written as grid.json and grid.md."""
    from . import pipeline as pl
    from .grid import grid_table, run_grid

    variants = pl.Variants(loaded, scratch=scratch)
    try:
        grid = run_grid(
            variants,
            scores,
            norms,
            utility,
            samples,
            grid_pruners(args),
            run.wanda,
            run.realign,
            run.eval,
            judge=judge_model(args, cache_root, log),
            mode=args.mode,
            rank_scores=rank_scores,
            scratch=scratch,
            log=log,
        )
    finally:
        variants.close()
    grid["model"] = loaded.spec.name
    written["grid.json"] = str(pl.write_json(args.out / "grid.json", grid))
    table = grid_table(grid)
    (args.out / "grid.md").write_text(f"Model `{loaded.spec.name}`.\n\n{table}")
    written["grid.md"] = str(args.out / "grid.md")
    log(table)
    return written


def localize_config(args: argparse.Namespace) -> LocalizeConfig:
    rungs = tuple(r.strip() for r in args.rungs.split(",") if r.strip())
    return LocalizeConfig(top_k=args.ladder_k, seeds=args.ladder_seeds, rungs=rungs)


def judge_model(args: argparse.Namespace, cache_root: Path, log: Any) -> Any:
    """The optional judge model (``--judge-model``), loaded."""
    if not args.judge_model:
        return None
    from . import pipeline as pl

    spec = ModelSpec(args.judge_model, dtype=args.dtype, device=args.device)
    return pl.GuardJudge(pl.load_model(spec, cache_dir=cache_root, log=log))


ESTIMATE_SAY_S = 60.0
"""Runs estimated longer than this say so, and how to make them shorter, before they start."""


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def say_estimate(
    command: str, run: RunConfig, loaded: Any, calib: Any, cache: Any, args: Any, log: Any
) -> dict[str, float]:
    """Print the estimated time of the long steps (Ships, Wanda statistics) before they start,
    when it is long, with the options that make it shorter. Under ``accelerate launch`` with
    N processes both steps are split N ways (``hsr_core.distributed``): the estimate is the
    one-process time over N (the gather at the end is not counted)."""
    from . import distributed
    from . import pipeline as pl

    ships = command in ("attribute", "realign", "evaluate", "export", "run", "localize", "grid")
    ships = ships and not run.heads_file
    probes = pl.probe_prompts(loaded, calib, run.ships) if ships else []
    safety, utility = (
        pl.calibration_samples(loaded, calib, run.wanda) if command != "attribute" else ([], [])
    )
    est = pl.estimate(
        loaded,
        probes,
        run.ships,
        safety,
        utility,
        run.wanda,
        cache,
        recompute=args.recompute,
        top_h=run.realign.top_h,
    )
    processes = distributed.world().size
    est = {
        **est,
        "attribute": est["attribute"] / processes,
        "calibrate": est["calibrate"] / processes,
    }
    total = est["attribute"] + est["calibrate"]
    if total > ESTIMATE_SAY_S:
        a = loaded.adapter
        steps = []
        if est["attribute"]:
            steps.append(
                f"Ships {_duration(est['attribute'])} for {len(probes)} probe prompts x "
                f"{a.num_layers * a.num_heads} heads"
            )
        if est["calibrate"]:
            steps.append(
                f"Wanda statistics {_duration(est['calibrate'])} for {len(safety)} + "
                f"{len(utility)} samples"
            )
        log(
            f"Estimated time: about {_duration(total)} on {loaded.device.type}"
            f"{f' (split over {processes} processes)' if processes > 1 else ''} "
            f"({', '.join(steps)}; one forward pass takes {est['forward'] * 1000:.0f} ms). "
            "Shorter: --ships-samples 8 --calib-samples 32 (the app's CPU settings), "
            "--heads-file with an earlier run's heads.jsonl, or a GPU. Results are cached: a "
            "second run reuses them."
        )
    return est


def execute(command: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``command``; returns what was written (file name -> path)."""
    from safetensors.torch import save_file

    from . import pipeline as pl
    from .distributed import local_device, world

    w = world()  # accelerate launch: Ships and the statistics split among the processes
    # several processes: each its own GPU, or its own group of --gpus-per-process GPUs
    args.device = local_device(args.device, args.gpus_per_process)
    run = run_config(args)  # checks every setting before a model is loaded
    if command == "localize":
        localize_config(args)
    if command == "grid":
        grid_pruners(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache_root = args.cache_dir or pl.default_cache_dir()
    cache = pl.ResultCache(cache_root)
    quiet = args.quiet or not w.is_main  # one voice: the main process's
    log = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    written: dict[str, Any] = {}
    timings: dict[str, float] = {}
    cached: dict[str, bool] = {}

    t0 = time.perf_counter()
    loaded = pl.load_model(run.model, cache_dir=cache_root, log=log)
    timings["load"] = time.perf_counter() - t0
    info = loaded.describe()
    log(
        f"Loaded {info['architecture']}: {info['parameters'] / 1e6:.1f} M parameters, "
        f"{info['num_layers']} layers x {info['num_heads']} heads ({info['num_kv_heads']} KV), "
        f"{info['device']}, {info['dtype']}"
    )
    a = loaded.adapter
    total_heads = a.num_layers * a.num_heads
    run = run_config(args, total_heads)
    if args.top_h is None and total_heads < 10:
        log(f"top_h defaults to all {total_heads} heads of this small model")
    run.realign.check_heads(a.num_layers, a.num_heads)
    calib = pl.load_calibration(run.data, columns=run.column_map(), utility_source=run.utility_data)
    eval_samples = pl.load_eval(args.eval_data) if args.eval_data else None
    log(
        f"Data: {len(calib.safety)} harmful and {len(calib.utility)} benign samples ({calib.source})"
    )

    if w.is_main:
        say_estimate(command, run, loaded, calib, cache, args, log)
    scores = None
    if command in ("attribute", "realign", "evaluate", "export", "run", "localize", "grid"):
        if run.heads_file:
            scores = pl.read_heads_jsonl(run.heads_file, a.num_layers, a.num_heads)
            timings["attribute"], cached["attribute"] = 0.0, True
        else:
            r = pl.attribute(
                loaded,
                pl.probe_prompts(loaded, calib, run.ships),
                run.ships,
                cache,
                top_h=run.realign.top_h,
                recompute=args.recompute,
            )
            scores = r.value
            timings["attribute"], cached["attribute"] = r.seconds, r.cached
            log(f"Ships: {'from cache' if r.cached else f'{r.seconds:.1f} s'}")
            if r.extra is not None and w.is_main:  # screening (our extension): which are exact
                rec = pl.screen_record(r.extra, run.ships)
                written["screen.json"] = str(pl.write_json(out / "screen.json", rec))
                log(f"Ships screening (our extension): {rec['rescored']} heads re-scored exactly")
        if w.is_main:  # files are written once, by the main process
            written["heads.jsonl"] = str(pl.write_heads_jsonl(scores, out / "heads.jsonl"))
    if command == "attribute":
        if w.is_main:
            summ = pl.summary(loaded, run, None, None, timings, cached)
            pl.write_json(out / "summary.json", summ)
        return written

    safety, utility = pl.calibration_samples(loaded, calib, run.wanda)
    r = pl.calibrate(loaded, safety, utility, run.wanda, cache, recompute=args.recompute)
    norms = r.value
    timings["calibrate"], cached["calibrate"] = r.seconds, r.cached
    if not w.is_main:
        return written  # masks, HSR, evaluation and every file: the main process alone
    if command == "calibrate":
        tensors = {f"safety/{k}": v for k, v in norms.safety.items()} | {
            f"utility/{k}": v for k, v in norms.utility.items()
        }
        save_file(tensors, out / "norms.safetensors")
        written["norms.safetensors"] = str(out / "norms.safetensors")
        return written

    scratch = Path(cache_root) / "variants"
    rank_scores = None
    if command != "prune":  # the weights are dense here
        rank_scores = pl.ranking_scores(loaded, safety, utility, run.realign, run.wanda)
    if command == "grid":
        return run_grid_command(
            rank_scores,
            loaded,
            run,
            scores,
            norms,
            utility,
            eval_samples,
            scratch,
            args,
            cache_root,
            log,
            written,
        )
    r = pl.prune(loaded, norms, utility, run.wanda, scratch=scratch)  # weights still dense here
    timings["prune"] = r.seconds
    pruning = r.value
    masks = pruning.masks
    log(f"{PRUNER_LABELS[run.wanda.pruner]} masks in {r.seconds:.1f} s")
    variants = pl.Variants(loaded, scratch=scratch)
    try:
        variants.install(masks, None, pruning.updated)
        restore = None
        if command != "prune":
            ranks = pl.rank_cache(variants, norms, rank_scores)
            r = pl.realign(loaded, masks, scores, run.realign, ranks)
            timings["realign"] = r.seconds
            restore = r.value
            variants.install(masks, restore, pruning.updated)
            log(
                f"HSR: restored {restore.count} weights ({restore.per_10k_pruned:.3f} per 10k pruned) "
                f"in heads {', '.join(h.label for h in restore.heads)}"
            )
        if command == "localize":
            t = time.perf_counter()
            ladder = pl.localize(
                variants,
                scores,
                restore,
                eval_samples,
                localize_config(args),
                run.eval,
                judge=judge_model(args, cache_root, log),
            )
            timings["localize"] = time.perf_counter() - t
            written["localize.json"] = str(pl.write_json(out / "localize.json", ladder))
            for rung in ladder["rungs"]:
                log(
                    f"{rung['label']:>48}: ASR {rung['asr']:.0%}, benign refusals "
                    f"{rung['refusal_rate_benign']:.0%}, {rung['restored']:,} weights back"
                )
            return written
        result = None
        if eval_samples is not None and command in ("evaluate", "run"):
            t = time.perf_counter()
            judge = judge_model(args, cache_root, log)
            result = pl.evaluate(variants, eval_samples, run.eval, judge=judge)
            timings["evaluate"] = time.perf_counter() - t
            written["eval.json"] = str(pl.write_json(out / "eval.json", result))
            for line in pl.evaluation_lines(result):
                log(line)
        summ = pl.summary(loaded, run, masks, restore, timings, cached)
        if args.export or command == "export":
            t = time.perf_counter()
            for name in ["pruned"] + (["realigned"] if restore is not None else []):
                card = pl.model_card(name, summ, result)
                written[f"{name}/"] = str(pl.export_variant(variants, name, out / name, card))
            timings["export"] = time.perf_counter() - t
        if command != "evaluate":
            timings["total"] = time.perf_counter() - t0
            summ["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
            written["summary.json"] = str(pl.write_json(out / "summary.json", summ))
    finally:
        variants.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet or int(os.environ.get("RANK", "0")) > 0:  # accelerate launch: one set of bars
        os.environ["TQDM_DISABLE"] = "1"
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import torch

    from .distributed import world
    from .pipeline import Cancelled, DataError, LmEvalError, LmEvalMissing, ModelLoadError

    w = world()
    try:
        written = execute(args.command, args)
    except (
        ConfigError,
        DataError,
        ModelLoadError,
        Cancelled,
        ValueError,
        LmEvalError,
        LmEvalMissing,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:
        print(
            f"error: out of memory ({str(e).splitlines()[0]}). Lower --calib-batch / --eval-batch "
            "/ --ships-batch, use --dtype bfloat16, or a smaller model.",
            file=sys.stderr,
        )
        return 3
    finally:
        w.close()
    if w.is_main:
        print(json.dumps(written, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
