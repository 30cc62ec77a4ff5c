#!/usr/bin/env bash
# The whole pipeline, phase after phase: prepare -> SFT -> reward model -> GRPO -> evaluation.
#
#   scripts/run_pipeline.sh                          # CPU recipe, data in data/raw/ECG-Expert-QA (downloaded if absent)
#   RAW_DIR=../shared/ECG-Expert-QA scripts/run_pipeline.sh
#   RECIPE=llama-3.2-3b scripts/run_pipeline.sh      # the Llama recipe on a CUDA machine
#   REDO=sft,grpo scripts/run_pipeline.sh            # run these phases again (REDO=all: every phase)
#   LAUNCH="accelerate launch --config_file configs/accelerate/ddp.yaml" RECIPE=llama-3.2-3b scripts/run_pipeline.sh
#
# Restartable: a phase whose output is complete is skipped; SFT and GRPO resume from their last
# checkpoint when a run was interrupted. Wall time per phase goes to reports/pipeline_times.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."

RECIPE=${RECIPE:-cpu}
PY=${PYTHON:-.venv/bin/python}
RAW_DIR=${RAW_DIR:-}
REDO=${REDO:-}
LAUNCH=${LAUNCH:-$PY}   # e.g. "accelerate launch --config_file configs/accelerate/ddp.yaml" for several GPUs
CFG=${CFG_DIR:-configs/$RECIPE}            # tests point this at a folder of tiny-model configs
MODELS=${ECG_MODELS_DIR:-models}
PROCESSED=${PROCESSED_DIR:-data/processed} # where the prepare config writes
REPORTS=${REPORTS_DIR:-reports}
TIMES=$REPORTS/pipeline_times.tsv

[[ -d $CFG ]] || { echo "error: no recipe folder $CFG (recipes: $(ls configs | grep -v accelerate | tr '\n' ' '))" >&2; exit 2; }
[[ -x $PY ]] || { echo "error: $PY not found: run 'make setup' first" >&2; exit 2; }
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

# 2-4. training phases; a restarted run resumes from its last checkpoint
# shellcheck disable=SC2086
phase 2 sft "[[ -f $MODELS/sft/.complete ]]" $LAUNCH sft_train.py --config $CFG/sft.yaml
# shellcheck disable=SC2086
phase 3 reward "[[ -f $MODELS/reward/.complete ]]" $LAUNCH reward_model.py --config $CFG/reward.yaml
# shellcheck disable=SC2086
phase 4 grpo "[[ -f $MODELS/rlhf/.complete ]]" $LAUNCH grpo_train.py --config $CFG/grpo.yaml

# 5. evaluation: answers are cached, so a rerun only generates what is missing
phase 5 eval "false" $PY evaluate.py --config $CFG/eval.yaml --models base,sft,rlhf --run-name pipeline-$RECIPE

echo
echo "Report:  $REPORTS/pipeline-$RECIPE/report.html  (and report.md)"
echo "Times:   $TIMES"
echo "Chat:    $PY chat.py --config $CFG/chat.yaml --model rlhf     (or scripts/chat_with_model.sh rlhf)"
