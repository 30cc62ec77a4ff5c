"""Phase 6: chat with a model of the pipeline, interactively in a terminal or one question at a time.

Usage:
    python chat.py --config configs/cpu/chat.yaml                    # the recipe's final model (rlhf)
    python chat.py --config configs/cpu/chat.yaml --model sft        # base | sft | rlhf | FOLDER | HUB_ID
    python chat.py --model base --temperature 0 --max-new-tokens 128
    python chat.py --model rlhf --prompt "What is a normal PR interval?"    # one-shot: the answer on stdout
    echo "What do peaked T waves indicate?" | python chat.py --model rlhf    # one-shot from standard input
    scripts/chat_with_model.sh sft                                   # RECIPE=llama-3.2-3b for the GPU recipe

In the chat: /help, /reset, /system [TEXT], /settings, /set KEY VALUE, /quit (or Ctrl-D). Replies stream;
the history is trimmed, oldest exchange first, to the model's context. In the reasoning answer format (by
default the one in the model folder's train_config.yaml) the <think> section is shown apart from the answer,
on stderr in one-shot mode. A research model: its answers are not medical advice.
"""

import sys

from utils.chat.session import ChatConfig
from utils.chat.terminal import run_chat
from utils.core.cli import run
from utils.core.runtime import configure_process


def main(config: ChatConfig):
    run_chat(config)


if __name__ == "__main__":
    configure_process()  # before anything imports torch: OpenMP wait policy, allocator
    sys.exit(run(main, ChatConfig, __doc__))
