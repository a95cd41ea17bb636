#!/usr/bin/env bash
# The GPU benchmarks of issue 2 in one command (about 3 minutes on an H100 or an H200), for a lent
# device machine that has torch and transformers (no gradio needed):
#
#     bash bench/gpu_session.sh "$OUT"
#
# Writes one JSON per run and the printed tables to the folder given (default bench/results/gpu),
# and the card's name into each file. Copy the JSON into bench/results/ and the figures into
# docs/BENCHMARKS.md, naming the card.
set -euo pipefail
out="${1:-bench/results/gpu}"
mkdir -p "$out"
card=$(python -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")  # h100, h200
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/card.txt" || true
# vicuna-7b shape: Ships (naive loop sampled on 32 heads), Wanda statistics, masks by stage
python bench/bench_core.py --model shape:vicuna-7b --tokens 2048 --dtype bfloat16 --device cuda \
    --prompts 1 --naive-heads 32 --json "$out/$card-vicuna-7b.json" 2>&1 | grep -v '%|' | tee "$out/$card-tables.txt"
# llama3-8b shape (GQA): Wanda statistics and masks only (Ships was measured: 2.03x)
python bench/bench_core.py --model shape:llama3-8b --tokens 2048 --dtype bfloat16 --device cuda \
    --skip-ships --json "$out/$card-llama3-8b-wanda.json" 2>&1 | grep -v '%|' | tee -a "$out/$card-tables.txt"
