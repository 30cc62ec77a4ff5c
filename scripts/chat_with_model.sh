#!/usr/bin/env bash
# Chat with a model of the pipeline through the recipe's chat config.
#
#   scripts/chat_with_model.sh [base|sft|rlhf|FOLDER|HUB_ID] [chat.py flags...]
#   scripts/chat_with_model.sh rlhf                                  # interactive chat
#   scripts/chat_with_model.sh sft --prompt "What is a normal QRS?"  # one answer on stdout
#   RECIPE=llama-3.2-3b scripts/chat_with_model.sh rlhf              # the GPU recipe
#
# RECIPE picks configs/$RECIPE/chat.yaml (default cpu); PYTHON the interpreter (default .venv/bin/python).
# Without a model argument the config's model is used.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RECIPE="${RECIPE:-cpu}"
CONFIG="$ROOT/configs/$RECIPE/chat.yaml"
if [[ ! -f "$CONFIG" ]]; then
  echo "error: RECIPE=$RECIPE: no $CONFIG (recipes: $(ls "$ROOT/configs" | tr '\n' ' '))" >&2
  exit 2
fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
args=()
if [[ $# -gt 0 && "$1" != -* ]]; then
  model="$1"
  shift
  # A folder given relative to the caller's directory must survive the cd below.
  if [[ -e "$model" ]]; then model="$(cd "$(dirname "$model")" && pwd)/$(basename "$model")"; fi
  args+=(--model "$model")
fi
# The recipes' paths (data/, models/) are relative to the repository root.
cd "$ROOT"
exec "$PYTHON" chat.py --config "$CONFIG" "${args[@]}" "$@"
