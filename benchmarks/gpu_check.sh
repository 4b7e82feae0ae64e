#!/usr/bin/env bash
# Every GPU measurement in one command, sized for one H100/H200; each step has a time limit, all together 580 s:
#   1. throughput, bertqa vs transformers.Trainer (run_qa.py setup and tuned), BERT-base shape, bf16, eager;
#      then where one bertqa update spends its time (benchmarks/profile_loop.py)
#   2. full SQuAD v1.1 fine-tune of MiniLM (the full-v1 preset), official dev set; then bertqa and the tuned Trainer
#      compiled (throughput, fewer windows: compiling every batch shape takes most of the step)
#   3. SQuAD v2 article split (the v2-split preset), with the calibrated no-answer threshold
#   4. the original recipe with bertqa and with the Trainer baseline, for F1 and wall time side by side
#   5. memory: peak memory and update time of full fine-tuning, gradient checkpointing and LoRA (BERT-base shape,
#      384 tokens, batch 16: benchmarks/memory.py); FSDP through docs/accelerate/fsdp.yaml: train with checkpoints,
#      resume from the middle one (the same final F1), answer with the gathered final model
# ONLY="memory fsdp fsdp-resume fsdp-answer" runs just the steps named (each step's name is printed as it starts).
# Needs torch, transformers, accelerate, tqdm, numpy and matplotlib (not datasets) and a model folder; make one that
# travels light with
#   python scripts/pack_model.py --model minilm-l6 --dtype float16 --out gpu/minilm-fp16
# Usage: OUT=runs/gpu MODEL=gpu/minilm-fp16 bash benchmarks/gpu_check.sh      (SMOKE=1: tiny sizes, to try it on a CPU)
# Writes gpu_check.log (everything printed but progress bars) and the JSON/plots named below under $OUT. The runs
# themselves go to $RUNS (default /tmp/bertqa-gpu-runs): its run folders are emptied first, so a second call never
# reports an earlier call's results; its tokenized-data cache is kept.
set -uo pipefail
OUT=${OUT:-runs/gpu}
MODEL=${MODEL:-gpu/minilm-fp16}
RUNS=${RUNS:-/tmp/bertqa-gpu-runs}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
if [[ -e $OUT/gpu_check.log ]]; then
  echo "$OUT already holds a gpu_check.log; choose another OUT or remove it" >&2
  exit 2
fi
rm -rf "$RUNS/full-v1" "$RUNS/v2-split" "$RUNS/recipe" "$RUNS/recipe-trainer" "$RUNS/fsdp" "$RUNS/fsdp-resumed"
mkdir -p "$OUT" "$RUNS"
LOG=$OUT/gpu_check.log
: >"$LOG"
if [[ ${SMOKE:-0} == 1 ]]; then
  BENCH=(--windows 64 --batch-size 8 --eval-examples 16 --precision no)
  PROFILE=(--windows 32 --batch-size 8 --steps 2 --precision no)
  SMALL=(--max-train-examples 64 --max-eval-examples 32 --max-steps 2 --batch-size 8)
  COMPILE_WINDOWS=32
  MEMORY=(--max-seq-length 64 --batch-size 2 --steps 1 --precision no)
  SLOWER=6  # a CPU checks the plumbing, not the GPU's time limits
else
  BENCH=(--windows 2048 --batch-size 64 --eval-examples 1000 --shape bert-base --precision bf16)
  PROFILE=(--windows 1024 --batch-size 64 --steps 10 --shape bert-base --precision bf16)
  SMALL=()
  COMPILE_WINDOWS=1024
  MEMORY=(--shape bert-base --max-seq-length 384 --batch-size 16 --steps 5 --precision bf16)
  SLOWER=1
fi
WORKERS=$(( $(nproc) > 8 ? 8 : $(nproc) ))
COMMON=(--model "$MODEL" --tokenize-workers "$WORKERS" --cache-dir "$RUNS/cache" --log-every 50)

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log everything, never stop the later steps
  local name=$1 limit=$(($2 * SLOWER))
  shift 2
  if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then return; fi
  echo "=== $name ($(date +%T)): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep --line-buffered -v -e '^train:' -e 'it/s\]' | tee -a "$LOG"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOG"
}

step device 15 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "
import torch, transformers, accelerate; print(\"torch\", torch.__version__, \"transformers\", transformers.__version__,
\"accelerate\", accelerate.__version__, \"cuda\", torch.version.cuda)"'
step bench-eager 100 python benchmarks/benchmark.py --model "$MODEL" "${BENCH[@]}" \
  --json "$OUT/bench_eager.json"
step profile 30 python benchmarks/profile_loop.py --model "$MODEL" "${PROFILE[@]}" --top 8
step full-v1 170 python scripts/train.py --preset full-v1 "${COMMON[@]}" "${SMALL[@]}" --output-dir "$RUNS/full-v1"
cp "$RUNS/full-v1/metrics.jsonl" "$OUT/full_v1_metrics.jsonl" 2>/dev/null
cp "$RUNS/full-v1/training_curves.png" "$OUT/full_v1_curves.png" 2>/dev/null
step bench-compile 140 python benchmarks/benchmark.py --model "$MODEL" "${BENCH[@]}" --windows "$COMPILE_WINDOWS" \
  --compile --trainers tuned --json "$OUT/bench_compile.json"
step v2-split 45 python scripts/train.py --preset v2-split "${COMMON[@]}" "${SMALL[@]}" --output-dir "$RUNS/v2-split"
cp "$RUNS/v2-split/metrics.jsonl" "$OUT/v2_split_metrics.jsonl" 2>/dev/null
step recipe 45 python scripts/train.py --preset recipe "${COMMON[@]}" "${SMALL[@]}" --eval-before-training false \
  --eval-every-steps none --output-dir "$RUNS/recipe"
step recipe-trainer 35 python benchmarks/trainer_baseline.py --preset recipe "${COMMON[@]}" "${SMALL[@]}" \
  --output-dir "$RUNS/recipe-trainer" --json "$OUT/recipe_trainer.json"
step memory 90 python benchmarks/memory.py --model "$MODEL" "${MEMORY[@]}" --json "$OUT/memory.json"
FSDP=(accelerate launch --config_file docs/accelerate/fsdp.yaml --num_processes 1 scripts/train.py --preset recipe
  "${COMMON[@]}" "${SMALL[@]}" --max-steps 60 --save-every-steps 30 --keep-checkpoints 2 --eval-every-steps none)
step fsdp 60 "${FSDP[@]}" --output-dir "$RUNS/fsdp"
cp "$RUNS/fsdp/metrics.jsonl" "$OUT/fsdp_metrics.jsonl" 2>/dev/null
# The same run stopped after update 30: its folder then, resumed; its final F1 must equal the straight run's.
step fsdp-resume 60 bash -c 'cp -r "$0/fsdp" "$0/fsdp-resumed" && cd "$0/fsdp-resumed" &&
  rm -rf final_model best_model checkpoints/step_00000060 && cd - >/dev/null && "${@:1}" --resume latest \
  --output-dir "$0/fsdp-resumed" && tail -n1 "$0/fsdp/metrics.jsonl" "$0/fsdp-resumed/metrics.jsonl"' \
  "$RUNS" "${FSDP[@]}"
step fsdp-answer 30 python scripts/predict.py "$RUNS/fsdp/final_model" -q "Who wrote the book?" \
  -c "The book was written by Ann Lee in 1990."
echo "done ($(date +%T))" | tee -a "$LOG"
