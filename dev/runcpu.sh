#!/usr/bin/env bash
# The whole nanochat pipeline, tiny, on a CPU (about 15 minutes on 2 cores): data, tokenizer, a
# depth-4 GPT, midtraining, SFT, evaluations, the report card, and a chat answer at the end.
#
#   bash dev/runcpu.sh
#
# Artifacts go to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat); set NANOCHAT_MIRROR to run
# offline from a mirror. Re-running continues where a crashed or interrupted run stopped: finished
# stages are skipped, training resumes from its last checkpoint. To start over, delete
# $NANOCHAT_BASE_DIR/runcpu. The sizes below can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
NUM_SHARDS="${NUM_SHARDS:-8}"            # pretraining shards to download (the last is validation)
TOK_CHARS="${TOK_CHARS:-50000000}"       # tokenizer training text
VOCAB="${VOCAB:-4096}"
DEPTH="${DEPTH:-4}"
SEQ_LEN="${SEQ_LEN:-512}"
BATCH="${BATCH:-8}"                      # sequences per step (one micro-batch)
BASE_STEPS="${BASE_STEPS:-200}"
MID_STEPS="${MID_STEPS:-60}"
SFT_STEPS="${SFT_STEPS:-60}"
EVAL_LIMIT="${EVAL_LIMIT:-24}"           # items per CORE task, problems per chat task
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-128}"
RUN_RL="${RUN_RL:-0}"
RL_STEPS="${RL_STEPS:-10}"
SAVE_EVERY="${SAVE_EVERY:-20}"           # training checkpoints: what a rerun resumes from

RUN_DIR="$NANOCHAT_BASE_DIR/runcpu"      # a log per stage, and a marker per finished stage
TOKENS=$((BATCH * SEQ_LEN))
TRAIN=(--device_batch_size="$BATCH" --max_seq_len="$SEQ_LEN" --save_every="$SAVE_EVERY" --resume=auto --model_tag="d$DEPTH")

# shellcheck source=dev/pipeline.sh
source dev/pipeline.sh

stage report-reset python -m nanochat.report reset
stage data python -m nanochat.dataset -n "$NUM_SHARDS"
stage tokenizer python -m scripts.tok_train --max_chars="$TOK_CHARS" --vocab_size="$VOCAB"
stage tokenizer-eval python -m scripts.tok_eval
stage base-train python -m scripts.base_train --depth="$DEPTH" "${TRAIN[@]}" --total_batch_size="$TOKENS" \
    --num_iterations="$BASE_STEPS" --eval_every=$((BASE_STEPS / 4)) --eval_tokens=$((4 * TOKENS)) \
    --core_metric_every=-1
stage base-loss python -m scripts.base_loss --device_batch_size="$BATCH" --split_tokens=$((4 * TOKENS))
stage base-eval python -m scripts.base_eval --max_per_task="$EVAL_LIMIT"
stage mid-train python -m scripts.mid_train "${TRAIN[@]}" --total_batch_size="$TOKENS" --num_iterations="$MID_STEPS" \
    --eval_every=$((MID_STEPS / 2)) --eval_tokens=$((4 * TOKENS)) --simple_spelling_size=2000 --spelling_bee_size=1000
stage mid-eval python -m scripts.chat_eval -i mid -x "$EVAL_LIMIT" -m "$MAX_NEW_TOKENS"
# ARC-Challenge's train split is left out: the offline mirror does not have it.
stage sft python -m scripts.chat_sft "${TRAIN[@]}" --device_batch_size=4 --examples_per_step=16 \
    --num_iterations="$SFT_STEPS" --eval_every=$((SFT_STEPS / 2)) --eval_conversations=32 \
    --eval_max_problems="$EVAL_LIMIT" --exclude=ARC-Challenge
stage sft-eval python -m scripts.chat_eval -i sft -x "$EVAL_LIMIT" -m "$MAX_NEW_TOKENS"
if [ "$RUN_RL" = 1 ]; then
    stage rl python -m scripts.chat_rl --model_tag="d$DEPTH" --save_every=5 --resume=auto --device_batch_size=8 \
        --examples_per_step=4 --num_samples=4 --max_new_tokens=64 --num_iterations="$RL_STEPS" \
        --eval_every="$RL_STEPS" --eval_examples="$EVAL_LIMIT"
    stage rl-eval python -m scripts.chat_eval -i rl -x "$EVAL_LIMIT" -m "$MAX_NEW_TOKENS"
fi

[ "$DRY_RUN" = 1 ] && exit 0
python -m nanochat.report generate
echo
echo "== a question for the model:"
python -m scripts.chat_cli -p "Why is the sky blue?" -m 64
echo
echo "report card: $NANOCHAT_BASE_DIR/report/report.md"
