"""Answers of the built-in SmolLM2 (+ safety adapter) pruned by Wanda, for the incoherence fixtures.

Writes one JSON line per answer (sparsity, prompt id, harmful, answer) for a reproducible subset
of the held-out evaluation split, greedy, with the pruned variant only. The lines in
``tests/fixtures/pruned_answers.jsonl`` were made with this script and then labelled by hand
(the ``label`` field: ``incoherent`` or ``coherent``); the labels are not computed.

Usage:
    python scripts/pruned_answers.py --out /tmp/answers.jsonl            # 0.5 and 0.6
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hsr_core import pipeline as pl  # noqa: E402
from hsr_core.config import EvalConfig, ModelSpec, WandaConfig  # noqa: E402
from hsr_core.evaluate import generate  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sparsity", type=float, nargs="*", default=[0.5, 0.6])
    p.add_argument("--harmful", type=int, default=24)
    p.add_argument("--benign", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument(
        "--dense", action="store_true", help="also the dense model's answers (sparsity 0.0)"
    )
    args = p.parse_args()

    cache_root = pl.default_cache_dir()
    cache = pl.ResultCache(cache_root)
    loaded = pl.load_model(ModelSpec("builtin:smollm2-135m-safe"), cache_dir=cache_root)
    calib = pl.load_calibration("builtin")
    samples = pl.load_eval("builtin")
    harmful = pl.select([s for s in samples if s.harmful], args.harmful, seed=1)
    benign = pl.select([s for s in samples if not s.harmful], args.benign, seed=1)
    picked = harmful + benign
    cfg = EvalConfig(max_new_tokens=args.max_new_tokens, batch_size=12)
    lines = []
    if args.dense:
        answers = generate(loaded, picked, cfg, desc="dense")
        lines += [
            {"sparsity": 0.0, "id": s.id, "harmful": bool(s.harmful), "answer": a}
            for s, a in zip(picked, answers, strict=True)
        ]
    for sparsity in args.sparsity:
        wanda = WandaConfig(sparsity=sparsity)
        safety, utility = pl.calibration_samples(loaded, calib, wanda)
        norms = pl.calibrate(loaded, safety, utility, wanda, cache).value
        masks = pl.prune(loaded, norms, utility, wanda).value.masks
        variants = pl.Variants(loaded, scratch=Path(cache_root) / "variants")
        try:
            variants.install(masks)
            with variants.use("pruned") as model:
                answers = generate(model, picked, cfg, desc=f"pruned {sparsity}")
        finally:
            variants.close()
        for s, a in zip(picked, answers, strict=True):
            lines.append(
                {"sparsity": sparsity, "id": s.id, "harmful": bool(s.harmful), "answer": a}
            )
    args.out.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    print(f"wrote {len(lines)} answers to {args.out}")


if __name__ == "__main__":
    main()
