#!/usr/bin/env bash
# Every stage of the pipeline on a CUDA machine, small, in under 8 minutes on one H100/H200
# (compilation included): the engine's exactness tests on the GPU (CUDA graphs), data, tokenizer,
# base training (a d12 model, compiled, bf16, batch size found automatically; again with --fp8
# where the GPU has float8 matmuls, without sliding windows, with document masks, and with Canon
# layers and growing windows), base loss, CORE, midtraining, all six chat evals, SFT, two RL
# steps, chat_cli and one streamed chat_web answer. With several GPUs every stage runs on all of them.
#
#   bash dev/gpu_check.sh           # prints a table: stage, ok/failed, seconds, its key number
#
# Exits 1 if any stage failed (its log's tail is printed; every log stays in $CHECK_DIR). Data comes
# from $NANOCHAT_MIRROR if set, else the network. Artifacts go to $NANOCHAT_BASE_DIR (default: a
# fresh temporary folder, so each run downloads its data again and starts with no checkpoints). The sizes below can be set from the environment; GPU_CHECK_ON_CPU=1
# runs the same stages on the CPU (with tiny sizes: how the script itself is tested).
set -uo pipefail  # not -e: a failed stage is reported, and the check goes on
cd "$(dirname "$0")/.." || exit 1

if [ "${GPU_CHECK_ON_CPU:-0}" != 1 ] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "dev/gpu_check.sh needs CUDA (no CUDA device is visible to torch); run the CPU demo instead: bash dev/runcpu.sh" >&2
    exit 2
fi

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$(mktemp -d -t nanochat-gpu-check.XXXXXX)}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
NPROC="${NPROC:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}"  # the GPUs torch sees
NUM_SHARDS="${NUM_SHARDS:-8}"
TOK_CHARS="${TOK_CHARS:-100000000}"
VOCAB="${VOCAB:-32768}"
DEPTH="${DEPTH:-12}"
SEQ_LEN="${SEQ_LEN:-2048}"
TOTAL_BATCH="${TOTAL_BATCH:-$((SEQ_LEN * 64 * NPROC))}"  # tokens per step of base and midtraining
BASE_STEPS="${BASE_STEPS:-30}"
MID_STEPS="${MID_STEPS:-10}"
SFT_STEPS="${SFT_STEPS:-10}"
EVAL_ITEMS="${EVAL_ITEMS:-16}"          # CORE items per task, chat problems per task
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-64}"
STAGE_TIMEOUT="${STAGE_TIMEOUT:-300}"   # seconds before a stage counts as hung
CHECK_DIR="$NANOCHAT_BASE_DIR/gpu_check"
mkdir -p "$CHECK_DIR"
RUN=(torchrun --standalone --nproc_per_node="$NPROC")
TAG=(--model_tag=gpucheck)
ROWS=()
FAILED=0

# check NAME PATTERN COMMAND...: run COMMAND (log: $CHECK_DIR/NAME.log), time it, and take the last
# text in its output that matches PATTERN (an extended regex) as the stage's key number.
check() {
    local name=$1 pattern=$2 start=$SECONDS result=ok key command
    shift 2
    command="$*"
    echo "== $name: ${command%%$'\n'*}"  # (its first line: chat-web's is a program)
    if ! timeout "$STAGE_TIMEOUT" "$@" > "$CHECK_DIR/$name.log" 2>&1; then
        result=failed
        FAILED=1
        tail -n 15 "$CHECK_DIR/$name.log"
    fi
    key=$(grep -oE "$pattern" "$CHECK_DIR/$name.log" | tail -n 1 | tr -s ' ')
    ROWS+=("$(printf '%-12s %-7s %5d   %s' "$name" "$result" $((SECONDS - start)) "$key")")
}

# Serve the SFT model (chat_web, flags from argv) and ask it one question over HTTP, reading the
# answer as it streams.
ASK_WEB=$(cat <<'EOF'
import json, socket, subprocess, sys, time
import requests
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "-p", str(port), *sys.argv[1:]])
url = f"http://127.0.0.1:{port}"
try:
    deadline = time.time() + 120
    while True:
        try:
            print("health:", requests.get(url + "/health", timeout=2).json())
            break
        except requests.ConnectionError:
            if server.poll() is not None or time.time() > deadline:
                sys.exit("chat_web did not come up")
            time.sleep(0.5)
    start = time.time()
    body = {"messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 64}
    with requests.post(url + "/chat/completions", json=body, stream=True, timeout=120) as r:
        r.raise_for_status()
        events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    print("answer:", "".join(e.get("token", "") for e in events))
    if events[-1:] != [{"done": True}]:
        sys.exit(f"the stream did not end with done: {events[-1:]}")
    print(f"streamed {len(events) - 1} pieces in {time.time() - start:.1f} s")
finally:
    server.terminate()
    server.wait()
EOF
)

echo "gpu check: $NPROC process(es), artifacts in $NANOCHAT_BASE_DIR"
TEST_DEVICE=$([ "${GPU_CHECK_ON_CPU:-0}" = 1 ] && echo cpu || echo cuda)
# The engine's tests through CUDA graphs, and flex_attention's backward (the windows' and documents' training path).
check engine '[0-9]+ passed' env NANOCHAT_TEST_DEVICE="$TEST_DEVICE" NANOCHAT_DTYPE=float32 \
    python -m pytest -q -p no:cacheprovider tests/test_engine.py \
    tests/test_gpt.py::test_flex_attention_backward_matches_the_dense_mask_on_cuda
check data '[0-9]+ fetched' python -m nanochat.dataset -n "$NUM_SHARDS"
check tokenizer 'trained on [0-9,]+ characters' python -m scripts.tok_train --max_chars="$TOK_CHARS" --vocab_size="$VOCAB"
BASE=(--depth="$DEPTH" --max_seq_len="$SEQ_LEN" --total_batch_size="$TOTAL_BATCH" --num_iterations="$BASE_STEPS"
      --eval_every=0 --eval_tokens="$TOTAL_BATCH" --core_metric_every=-1)
TRAIN_KEY='loss: [0-9.]+ .* tok/sec: [0-9,]+ \| mfu: [^ ]+'  # the last step's smoothed loss and speed
check base-train "$TRAIN_KEY" "${RUN[@]}" -m scripts.base_train -- "${BASE[@]}" "${TAG[@]}"
# The same run with float8 matmuls, for its speed-up and its loss against bf16 (the line above).
if python -c "import sys, torch; from nanochat.fp8 import supported
sys.exit(not (torch.cuda.is_available() and supported(torch.device('cuda'))))" 2>/dev/null; then
    check base-fp8 "$TRAIN_KEY" "${RUN[@]}" -m scripts.base_train -- "${BASE[@]}" --fp8=1 --dry_run=1 --model_tag=gpucheck-fp8
else
    ROWS+=("$(printf '%-12s %-7s %5d   %s' base-fp8 skipped 0 'no float8 matmuls on this device')")
fi
# And without the sliding windows (flex_attention, compiled, in the line above), for their speed-up.
check base-nowindow "$TRAIN_KEY" "${RUN[@]}" -m scripts.base_train -- "${BASE[@]}" --window=0 --dry_run=1 \
    --model_tag=gpucheck-nowindow
# And with document masks (the full-context layers then run flex, not flash attention), for their cost.
check base-docmask "$TRAIN_KEY" "${RUN[@]}" -m scripts.base_train -- "${BASE[@]}" --doc_mask=1 --dry_run=1 \
    --model_tag=gpucheck-docmask
# And Canon layers with windows that grow (the compiled model retraces at the new window halfway).
check base-options "$TRAIN_KEY" "${RUN[@]}" -m scripts.base_train -- "${BASE[@]}" --canon=1 --window_stages=2 --dry_run=1 \
    --model_tag=gpucheck-options
check base-loss 'val bpb: [0-9.]+' "${RUN[@]}" -m scripts.base_loss -- "${TAG[@]}" --split_tokens="$TOTAL_BATCH" \
    --device_batch_size=8
check base-eval 'CORE +[-0-9.]+' "${RUN[@]}" -m scripts.base_eval -- "${TAG[@]}" --max_per_task="$EVAL_ITEMS"
check mid-train 'val bpb: [0-9.]+' "${RUN[@]}" -m scripts.mid_train -- "${TAG[@]}" --total_batch_size="$TOTAL_BATCH" \
    --num_iterations="$MID_STEPS" --eval_every=0 --eval_tokens="$TOTAL_BATCH" --simple_spelling_size=2000 \
    --spelling_bee_size=1000
check chat-eval 'ChatCORE: [-0-9.]+' "${RUN[@]}" -m scripts.chat_eval -- -i mid "${TAG[@]}" -x "$EVAL_ITEMS" \
    -m "$MAX_NEW_TOKENS"
# ARC-Challenge's train split is left out: the offline mirror does not have it.
check sft 'mmlu_acc: [0-9.]+' "${RUN[@]}" -m scripts.chat_sft -- "${TAG[@]}" --num_iterations="$SFT_STEPS" \
    --examples_per_step=$((8 * NPROC)) --eval_every=0 --eval_conversations=64 --eval_max_problems=64 --exclude=ARC-Challenge
check rl 'reward: [0-9.]+' "${RUN[@]}" -m scripts.chat_rl -- "${TAG[@]}" --num_iterations=2 --examples_per_step=$((4 * NPROC)) \
    --num_samples=8 --max_new_tokens="$MAX_NEW_TOKENS" --eval_every=0 --eval_examples=16 --eval_k=2
check chat-cli 'Assistant: .{0,40}' python -m scripts.chat_cli -i sft "${TAG[@]}" \
    -p "Why is the sky blue?" -m "$MAX_NEW_TOKENS"
check chat-web 'streamed [0-9]+ pieces in [0-9.]+ s' python -c "$ASK_WEB" -i sft "${TAG[@]}"

echo
printf '%-12s %-7s %5s   %s\n' stage result secs "key number"
printf '%s\n' "${ROWS[@]}"
[ "$FAILED" = 0 ] || echo "some stages failed; their logs are in $CHECK_DIR"
exit "$FAILED"
