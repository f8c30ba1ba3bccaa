#!/usr/bin/env bash
# Every GPU measurement the README reports, in one go, on one H100/H200 (about 10 minutes), from the repo root:
#   bash bench/gpu_session.sh [RESULTS_DIR]      (default gpu_results/: logs, bench_gpu.json, profiles)
# Wheels placed in .whl/ are installed first, for a Python that lacks datasets, trl or transformers==5.24.0.
set -uo pipefail
OUT=${1:-gpu_results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
echo "=== bench_gpu (SmolVLM-Instruct full FT, LLaVA-1.6-Mistral-7B LoRA): re-measure with padding-free batches,"
echo "    image de-duplication and dataloader workers (all defaults now), then profile 2 steps per run"
timeout 350 python3 bench/bench_gpu.py --model all --time_budget_s 240 --json "$OUT/bench_gpu.json" \
    --profile "$OUT/profile" > "$OUT/bench_gpu.log" 2>&1
echo "exit $?"; grep -v "it/s\]" "$OUT/bench_gpu.log" | tail -25
for f in "$OUT"/profile/*.txt; do [ -f "$f" ] && { echo "--- $f"; head -60 "$f"; }; done
echo "=== bench_trl on cuda (adpo vs TRL DPOTrainer, equal work)"
timeout 130 python3 bench/bench_trl.py --device cuda --models big --hidden_size 1024 --num_layers 8 \
    --refs live precomputed --steps 4 --warmup 2 --repeats 1 --batch_size 8 --threads 8 --workers 2 > "$OUT/bench_trl.log" 2>&1
echo "exit $?"; tail -8 "$OUT/bench_trl.log"
echo "=== scale-out checks (FSDP, FSDP+LoRA, DDP config) on one GPU"
timeout 100 bash tests/gpu/scaleout_check.sh "$OUT/scaleout" > "$OUT/scaleout.log" 2>&1
echo "exit $?"; grep -E "PASS|FAIL|losses" "$OUT/scaleout.log" | tail -10
