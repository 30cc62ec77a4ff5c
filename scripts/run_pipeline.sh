#!/usr/bin/env bash
# The whole pipeline, phase after phase: prepare -> SFT -> reward model -> GRPO -> evaluation.
#
#   scripts/run_pipeline.sh                          # CPU recipe, data in data/raw/ECG-Expert-QA (downloaded if absent)
#   RAW_DIR=../shared/ECG-Expert-QA scripts/run_pipeline.sh
#   RECIPE=llama-3.2-3b scripts/run_pipeline.sh      # the Llama recipe on a CUDA machine
#   REDO=sft,grpo scripts/run_pipeline.sh            # run these phases again (REDO=all: every phase)
#   LAUNCH="accelerate launch --config_file configs/accelerate/ddp.yaml" RECIPE=llama-3.2-3b scripts/run_pipeline.sh
#   LANES=1 scripts/run_pipeline.sh                  # one phase at a time (the default on a GPU)
#
# Restartable: a phase whose output is complete is skipped; SFT and GRPO resume from their last
# checkpoint when a run was interrupted. Wall time per phase goes to reports/pipeline_times.tsv.
#
# Two lanes on a CPU (LANES=2, the default there): GRPO trains on half the cores while the other half
# trains the reward model (unless GRPO's reward mix needs it first) and evaluates base and SFT, whose
# cached answers the last phase reuses; the last phase then answers with GRPO's model in two processes.
# Why: GRPO is mostly batched decoding, bound by memory bandwidth, so on 2 cores one thread steps as fast
# as two and the second core would idle; the side lane's work then costs no wall time. On a GPU the
# phases would compete for its memory, so LANES defaults to 1.
set -euo pipefail
cd "$(dirname "$0")/.."

RECIPE=${RECIPE:-cpu}
PY=${PYTHON:-.venv/bin/python}
RAW_DIR=${RAW_DIR:-}
REDO=${REDO:-}
LAUNCH=${LAUNCH:-$PY}   # e.g. "accelerate launch --config_file configs/accelerate/ddp.yaml" for several GPUs
LANES=${LANES:-auto}
CFG=${CFG_DIR:-configs/$RECIPE}            # tests point this at a folder of tiny-model configs
MODELS=${ECG_MODELS_DIR:-models}
PROCESSED=${PROCESSED_DIR:-data/processed} # where the prepare config writes
REPORTS=${REPORTS_DIR:-reports}
TIMES=$REPORTS/pipeline_times.tsv

[[ -d $CFG ]] || { echo "error: no recipe folder $CFG (recipes: $(ls configs | grep -v accelerate | tr '\n' ' '))" >&2; exit 2; }
[[ -x $PY ]] || { echo "error: $PY not found: run 'make setup' first" >&2; exit 2; }
cuda=0   # the check exits 0 when torch sees no GPU
$PY -c 'import sys, torch; sys.exit(torch.cuda.is_available())' 2>/dev/null || cuda=1
if [[ $LANES == auto ]]; then
  LANES=1
  # one process per phase, at least 2 cores, no GPU
  if [[ $LAUNCH == "$PY" ]] && (( $(nproc) >= 2 )) && (( ! cuda )); then
    LANES=2
  fi
fi
[[ $LANES == 1 || $LANES == 2 ]] || { echo "error: LANES=$LANES: expected 1, 2 or auto" >&2; exit 2; }

mkdir -p "$REPORTS"
[[ -f $TIMES ]] || printf 'phase\tseconds\tstatus\tfinished\n' > $TIMES

redo() { [[ ",$REDO," == *",all,"* || ",$REDO," == *",$1,"* ]]; }

phase() {  # phase NUMBER NAME DONE_TEST COMMAND...
  local n=$1 name=$2 done_test=$3; shift 3
  if ! redo "$name" && eval "$done_test"; then
    echo "[$n/5] $name: done already, skipped (REDO=$name to run it again)"
    return
  fi
  echo "[$n/5] $name: $*"
  local t0=$SECONDS
  "$@"
  local dt=$((SECONDS - t0))
  printf '%s\t%s\t%s\t%s\n' "$name" "$dt" ok "$(date -Is)" >> $TIMES
  echo "[$n/5] $name: finished in $((dt / 60)) min $((dt % 60)) s"
}

# 1. data: the given folder, data/raw, or a verified download of the pinned upstream commit
prep_args=(--config $CFG/prepare.yaml)
if [[ -n $RAW_DIR ]]; then
  prep_args+=(--raw-dir "$RAW_DIR")
elif ! ls data/raw/ECG-Expert-QA/*.json >/dev/null 2>&1; then
  prep_args+=(--download)
fi
phase 1 prepare "[[ -f $PROCESSED/.complete ]] && $PY -c 'import sys; from utils.data.card import verify_splits; from utils.data.rows import SPLITS; verify_splits(sys.argv[1], list(SPLITS))' $PROCESSED 2>/dev/null" $PY prepare_data.py "${prep_args[@]}"

# 2. SFT on every core: GRPO starts from it, so nothing can run beside it
# shellcheck disable=SC2086
phase 2 sft "[[ -f $MODELS/sft/.complete ]]" $LAUNCH sft_train.py --config $CFG/sft.yaml

reward() { phase 3 reward "[[ -f $MODELS/reward/.complete ]]" $LAUNCH reward_model.py --config $CFG/reward.yaml "$@"; }
grpo() { phase 4 grpo "[[ -f $MODELS/rlhf/.complete ]]" $LAUNCH grpo_train.py --config $CFG/grpo.yaml "$@"; }
# evaluation (phase name, report name, flags): answers are cached, so a rerun only generates what is missing;
# $eval_launch: how evaluate.py starts (several processes share the generation)
eval_launch=$PY
evaluate() { local name=$1 run=$2; shift 2; phase 5 $name "false" $eval_launch evaluate.py --config $CFG/eval.yaml --run-name $run "$@"; }

if [[ $LANES == 1 ]]; then
  eval_launch=$LAUNCH   # under accelerate launch, the GPUs share the generation too
  reward; grpo; evaluate eval pipeline-$RECIPE --models base,sft,rlhf
else
  threads=$(( $(nproc) > 1 ? $(nproc) / 2 : 1 ))
  # read from the YAML alone (importing GRPO's config takes seconds); an unreadable mix counts as needing
  # the reward model, and GRPO then names what is wrong with it
  needs_rm=$($PY -c 'import sys, yaml; from utils.rewards.mix import DEFAULT_WEIGHTS
mix = (yaml.safe_load(open(sys.argv[1])) or {}).get("rewards") or DEFAULT_WEIGHTS
print(int(float(mix.get("reward_model") or 0) > 0))' $CFG/grpo.yaml 2>/dev/null || echo 1)
  # GRPO's reward mix scores with the reward model: train it first, on every core
  (( needs_rm )) && reward
  log=$REPORTS/logs/side-lane.log
  mkdir -p "$(dirname "$log")"
  echo "[side lane] $( ((needs_rm)) || echo 'reward model, ')evaluation of base and SFT on $threads thread(s) beside GRPO; log: $log"
  (
    (( needs_rm )) || reward --num-threads $threads
    evaluate eval-base-sft pipeline-$RECIPE-sft --models base,sft --num-threads $threads
  ) > "$log" 2>&1 &
  side=$!
  # a failed or interrupted GRPO stops the side lane too (its children first: the subshell only waits)
  trap '[[ -n ${side:-} ]] && { pkill -P $side 2>/dev/null; kill $side 2>/dev/null; } || true' EXIT
  grpo --num-threads $threads
  if ! wait $side; then
    side=
    echo "error: the side lane failed (reward model or evaluation of base and SFT); its log, $log, ends:" >&2
    tail -n 15 "$log" >&2
    exit 1
  fi
  side=
  grep '^\[' "$log" || true   # the side lane's phase lines
  # GRPO's answers, the only ones not cached, in two processes on half the cores each: for the same reason
  # as the lanes, two one-thread decoders answer nearly twice as fast as one two-thread decoder
  # (not with LANES=2 forced on a GPU machine: the second process would look for a second GPU)
  (( cuda )) || eval_launch="$PY -m torch.distributed.run --standalone --nproc-per-node 2"
  evaluate eval pipeline-$RECIPE --models base,sft,rlhf --num-threads $threads
fi

echo
echo "Report:  $REPORTS/pipeline-$RECIPE/report.html  (and report.md)"
echo "Times:   $TIMES"
echo "Chat:    $PY chat.py --config $CFG/chat.yaml --model rlhf     (or scripts/chat_with_model.sh rlhf)"
