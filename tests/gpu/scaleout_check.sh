#!/usr/bin/env bash
# GPU-only scale-out checks (CI has no GPU; FSDP does not shard on CPU), from the repo root on a machine with a GPU:
#   bash tests/gpu/scaleout_check.sh [LOG_DIR]      (default scaleout_results/)
# Wheels placed in .whl/ are installed first, for a Python that lacks datasets or transformers==5.24.0.
# Checks, on one GPU with --bf16 and the tiny Idefics3: configs/fsdp.yaml trains with the frozen reference
# (sharded by adpo.reference), step-1 loss is log 2, the consolidated output reloads with from_pretrained;
# the same with LoRA (reference = adapters off); multi_gpu_config.yaml trains on the GPU.
set -euo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${1:-scaleout_results}
W=$(mktemp -d)
mkdir -p "$OUT"
python3 - "$W" <<'EOF'
import sys
from adpo.synthetic import counterfactual_rows, write_jsonl
from adpo.testing.tiny import build_tiny_idefics3
build_tiny_idefics3(f"{sys.argv[1]}/model")
write_jsonl(counterfactual_rows(16, seed=1), f"{sys.argv[1]}/rows")
EOF
ARGS=(--model_name_or_path "$W/model" --dataset_name "$W/rows/train.jsonl" --per_device_train_batch_size 2
      --max_steps 4 --logging_steps 1 --save_strategy no --report_to none --bf16 --learning_rate 1e-3)
check() {  # $1 output dir, $2 "model" | "adapter"
    python3 - "$1" "$2" <<'EOF'
import json, math, sys
out, kind = sys.argv[1], sys.argv[2]
losses = [e["loss"] for e in json.load(open(f"{out}/trainer_state.json"))["log_history"] if "loss" in e]
print(out, "losses", losses)
assert abs(losses[0] - math.log(2)) < 1e-3 and all(math.isfinite(v) for v in losses), losses
if kind == "model":
    from transformers import AutoModelForImageTextToText
    AutoModelForImageTextToText.from_pretrained(out)
    print(out, "reloads with from_pretrained")
EOF
}
status=0
run() {  # $1 name, $2 kind, rest: launcher command
    local name=$1 kind=$2; shift 2
    if timeout 150 "$@" --output_dir "$W/$name" >"$OUT/$name.log" 2>&1 && check "$W/$name" "$kind"; then
        echo "PASS $name"
    else
        echo "FAIL $name"; tail -30 "$OUT/$name.log"; status=1
    fi
}
run fsdp model accelerate launch --config_file configs/fsdp.yaml --num_processes 1 train_adpo_multimodal.py "${ARGS[@]}"
run fsdp_lora adapter accelerate launch --config_file configs/fsdp.yaml --num_processes 1 train_adpo_multimodal.py \
    "${ARGS[@]}" --use_peft --lora_dropout 0
run ddp model accelerate launch --config_file multi_gpu_config.yaml --num_processes 1 train_adpo_multimodal.py \
    "${ARGS[@]}"
exit $status
