#!/usr/bin/env bash
# The whole pipeline on one GPU node: a d20 model (~560M parameters) from raw text to a chat UI in a
# few hours on 8 H100/H200 GPUs.
#
#   bash speedrun.sh                                   # or, to survive a dropped SSH session:
#   screen -L -Logfile speedrun.log -S speedrun bash speedrun.sh
#
# Settings from the environment: NANOCHAT_BASE_DIR (default ~/.cache/nanochat), WANDB_RUN (a wandb
# run name; default dummy = no wandb), NPROC_PER_NODE (default: every GPU here), RUN_RL=1 to add
# reinforcement learning on GSM8K, DRY_RUN=1 to print the stages without running them.
# Running it again after a crash continues: finished stages are skipped, training resumes from
# its last checkpoint (delete $NANOCHAT_BASE_DIR/speedrun_d20 to start over).
set -euo pipefail
cd "$(dirname "$0")"

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export OMP_NUM_THREADS=1
WANDB_RUN="${WANDB_RUN:-dummy}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}"
[ "$NPROC_PER_NODE" -ge 1 ] || NPROC_PER_NODE=1
RUN_RL="${RUN_RL:-0}"
DEPTH="${DEPTH:-20}"
SHARDS="${SHARDS:-240}"               # ~54B characters: 20 tokens per parameter for d20, with margin
DEVICE_BATCH="${DEVICE_BATCH:-auto}"       # sequences per GPU per micro-batch; auto: the most that fit
RUN_DIR="$NANOCHAT_BASE_DIR/speedrun_d$DEPTH"
TORCHRUN=(torchrun --standalone --nproc_per_node="$NPROC_PER_NODE")
COMMON=(--run="$WANDB_RUN" --resume=auto --save_every=1000 --model_tag="d$DEPTH")

# shellcheck source=dev/pipeline.sh
source dev/pipeline.sh

install_nanochat() {
    if ! command -v cargo >/dev/null; then  # rustbpe is built from source
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
        # shellcheck source=/dev/null
        source "$HOME/.cargo/env"
    fi
    if command -v uv >/dev/null; then
        uv sync --extra plots && echo "installed with uv: .venv"
    else
        python -m pip install -e ".[plots]"
    fi
}
activate() {  # use uv's environment when there is one
    # shellcheck source=/dev/null
    if [ -d .venv ] && [ "$DRY_RUN" != 1 ]; then source .venv/bin/activate; fi
}

activate
stage install install_nanochat
activate
stage report-reset python -m nanochat.report reset
stage data-first python -m nanochat.dataset -n 8
# The rest of the shards download while the tokenizer trains on the first ones.
if [ "$DRY_RUN" = 1 ]; then
    echo "== data-rest (in the background): python -m nanochat.dataset -n $SHARDS"
else
    python -m nanochat.dataset -n "$SHARDS" > "$NANOCHAT_BASE_DIR/dataset_download.log" 2>&1 &
    DATASET_PID=$!
fi
stage tokenizer python -m scripts.tok_train --max_chars=2000000000 --vocab_size=65536
stage tokenizer-eval python -m scripts.tok_eval
if [ "$DRY_RUN" != 1 ] && ! wait "$DATASET_PID"; then
    echo "downloading the pretraining shards failed: see $NANOCHAT_BASE_DIR/dataset_download.log" >&2
    exit 1
fi
stage base-train "${TORCHRUN[@]}" -m scripts.base_train -- --depth="$DEPTH" --device_batch_size="$DEVICE_BATCH" "${COMMON[@]}"
stage base-loss "${TORCHRUN[@]}" -m scripts.base_loss
stage base-eval "${TORCHRUN[@]}" -m scripts.base_eval
stage mid-train "${TORCHRUN[@]}" -m scripts.mid_train -- --device_batch_size="$DEVICE_BATCH" "${COMMON[@]}"
stage mid-eval "${TORCHRUN[@]}" -m scripts.chat_eval -- -i mid
stage sft "${TORCHRUN[@]}" -m scripts.chat_sft -- "${COMMON[@]}"
stage sft-eval "${TORCHRUN[@]}" -m scripts.chat_eval -- -i sft
if [ "$RUN_RL" = 1 ]; then
    stage rl "${TORCHRUN[@]}" -m scripts.chat_rl -- "${COMMON[@]}"
    stage rl-eval "${TORCHRUN[@]}" -m scripts.chat_eval -- -i rl -a GSM8K
fi
rm -f "$RUN_DIR/report.done"  # the report always reflects every stage so far
stage report python -m nanochat.report generate
if [ "$DRY_RUN" != 1 ]; then
    cp "$NANOCHAT_BASE_DIR"/report/report.md "$NANOCHAT_BASE_DIR"/report/*.png . 2>/dev/null || true
    echo "report card: ./report.md. Talk to the model: python -m scripts.chat_web"
fi
