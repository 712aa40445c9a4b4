#!/usr/bin/env bash
# Issue 24, criterion 5: the same-run ratio of the single map against the reference (8 and 64
# tokens, random-weight Llama-3.2-3B, bench/gpu_headline.py's ratio step) and attribution graphs at
# length (random-weight SmolLM2-135M config, bench/bench_graph_lengths.py) on a GPU. One prepared
# run for a 15-minute device lease (the machine's start included): at most ~8.5 minutes.
#
#   bash bench/gpu_check.sh wheels           # HERE, once: .whl/ gets what the GPU image lacks
#   bash bench/gpu_issue24.sh                # THERE; device tool: carry [".whl"]
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LIN_LENS_PROGRESS=0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl || exit 2
export PYTHONPATH="/tmp/site:$PWD"
{ nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv; python3 -c \
    "import torch, transformers, transformer_lens as t; print(torch.__version__, transformers.__version__)"; } \
    > "$OUT/env.txt" 2>&1
echo "== ratio $(date +%T)"
timeout 230 python3 bench/gpu_headline.py --device cuda --skip llama,gemma --n-ratio 8,64 \
    --budget 210 --out "$OUT/gpu_headline.json" > "$OUT/gpu_headline.log" 2>&1
echo "ratio exit $?"; tail -12 "$OUT/gpu_headline.log"
echo "== graphs $(date +%T)"
timeout 250 python3 bench/bench_graph_lengths.py --random smollm2-135m --device cuda \
    --n 128,512,1024,2048 --timeout 110 --json "$OUT/graph_lengths.jsonl" > "$OUT/graph_lengths.log" 2>&1
echo "graphs exit $?"; cut -c1-600 "$OUT/graph_lengths.log"
echo "== done $(date +%T)"
