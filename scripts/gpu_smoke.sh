#!/usr/bin/env bash
# The command line end to end on a GPU, for a lent device machine (torch, transformers,
# pillow, tqdm; no gradio): both built-in tiny models through `run` with evaluation and export,
# in bfloat16 and float32 on CUDA, then the exported folders loaded back on the GPU.
#
#     bash scripts/gpu_smoke.sh OUT_DIR
#
# Writes each run's summary.json and eval.json (renamed per run) to OUT_DIR.
set -euo pipefail
out="${1:-gpu-smoke}"
mkdir -p "$out"
work=$(mktemp -d)
export HSR_CACHE_DIR="$work/cache"
device="${DEVICE:-cuda}"
nvidia-smi --query-gpu=name --format=csv,noheader || true
for spec in "tiny-llava-next bfloat16" "tiny-llama float32"; do
    set -- $spec
    /usr/bin/time -f "$1 $2: %e s wall" python -m hsr_core run --model "builtin:$1" --data builtin \
        --out "$work/$1" --export --device "$device" --dtype "$2" --eval-data assets/data/eval.jsonl \
        --max-new-tokens 16 2>&1 | grep -v '%|'
    cp "$work/$1/summary.json" "$out/$1-summary.json"
    cp "$work/$1/eval.json" "$out/$1-eval.json"
    python - "$work/$1" "$device" <<'PY'
import json, sys
from pathlib import Path
from hsr_core.config import ModelSpec
from hsr_core.models import load_model
d = Path(sys.argv[1])
s = json.loads((d / "summary.json").read_text())
want = {"pruned": s["pruned_weights"], "realigned": s["pruned_weights"] - s["restored"]}
for v, n_zero in want.items():
    m = load_model(ModelSpec(str(d / v), device=sys.argv[2]))
    zeros = sum(int((mod.weight == 0).sum()) for _, _, _, mod in m.adapter.iter_linears())
    print(f"{v}: loaded on {m.device}, {zeros} zero weights in the decoder linears")
    assert zeros == n_zero, f"{v}: {zeros} zero weights, expected {n_zero}"
print({k: s[k] for k in ("pruned_weights", "restored", "restored_per_10k_pruned", "selected_heads")})
PY
done
