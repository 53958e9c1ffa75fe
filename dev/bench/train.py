"""
Training throughput on this machine: tokens/s and MFU of a full training step (forward, backward,
Muon + AdamW) for depth 4 and 8, eager and (optionally) torch.compile'd, plus the data loader's
tokens/s per rank. On CPU, MFU is measured against the fp32 matmul rate this benchmark measures
first (there is no datasheet peak for a CPU); on CUDA against the GPU's bf16 peak.

Config (the reference recipe): vocab 8192, --max_seq_len=512 --device_batch_size=8
--total_batch_size=4096. The original nanochat trains depth 4 at ~365 tokens/s on these 2-core
machines (bf16 Newton–Schulz and embeddings on a CPU that runs bf16 ~150x slower than fp32).

    python dev/bench/train.py [--depths 4 8] [--compile] [--steps 5]   # needs a trained tokenizer for the loader
    python dev/bench/train.py --depths 20 --compile --fp8 --vocab 65536 --seq_len 2048 --batch 32   # one GPU
    python dev/bench/train.py --depths 4 --off key_offset smear   # also each of these recipe options off: its cost
    python dev/bench/train.py --depths 4 --on canon   # also each of these options (off in the recipe) on
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanochat.common import autodetect_device_type, make_parser  # noqa: E402
from nanochat.gpt import GPT, RECIPE, config_for_depth  # noqa: E402
from nanochat.optim import step_optimizers  # noqa: E402
from nanochat.training import peak_flops  # noqa: E402

REFERENCE_TOKENS_PER_SEC = {4: 365}  # the original recipe on these machines (issue #4)


def matmul_flops(device, n=2048, repeats=10):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.time()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.time() - t0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_throughput(depth, device, compile_model, steps, vocab=8192, T=512, B=8, fp8=False, options=None):
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config_for_depth(depth, vocab, T, **(options or {})))
    model.to_empty(device=device)
    model.init_weights()
    if fp8:
        model.use_fp8()
    optimizers = model.setup_optimizers()
    run = torch.compile(model, dynamic=False) if compile_model else model
    x = torch.randint(0, vocab, (B, T + 1), device=device)

    def step():
        loss = run(x[:, :-1], x[:, 1:])
        loss.backward()
        step_optimizers(optimizers, grad_clip=1.0)
        model.zero_grad(set_to_none=True)

    for _ in range(2):  # warmup (and compilation)
        step()
    sync(device)
    t0 = time.time()
    for _ in range(steps):
        step()
    sync(device)
    tok_per_sec = steps * B * T / (time.time() - t0)
    return tok_per_sec, model.estimate_flops()


def loader_throughput(T, packing, tokens=2_000_000, B=8):
    from nanochat.dataloader import tokenizing_distributed_data_loader
    from nanochat.tokenizer import get_tokenizer

    loader = tokenizing_distributed_data_loader(get_tokenizer(), B, T, "train", rank=0, world_size=1, packing=packing)
    state = next(loader)[2]
    while len(state["buffer"]) < 1000 and packing == "bestfit":
        state = next(loader)[2]  # steady state: the packing buffer is full
    before = state["stats"]
    batches = tokens // (B * T)
    t0 = time.time()
    for _ in range(batches):
        _, _, state = next(loader)
    dt = time.time() - t0
    used, cropped = (state["stats"][k] - before[k] for k in ("used", "cropped"))
    return batches * B * T / dt, cropped / max(1, used + cropped)


def main():
    parser = make_parser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to start on CPU)")
    parser.add_argument("--fp8", action="store_true", help="also measure float8 matmuls (GPUs with compute capability 8.9+)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device_type", default=None)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (d20 on a GPU: --vocab 65536 --seq_len 2048 --batch 32)")
    parser.add_argument("--off", nargs="*", default=[], choices=[k for k, v in RECIPE.items() if v and isinstance(v, bool)] + ["window"],
                        help="recipe options to also measure turned off (window: full attention), one at a time")
    parser.add_argument("--on", nargs="*", default=[], choices=[k for k, v in RECIPE.items() if v is False],
                        help="options the recipe leaves off to also measure turned on, one at a time")
    args = parser.parse_args()
    device = torch.device(args.device_type or autodetect_device_type())
    peak = peak_flops(device)
    measured = matmul_flops(device)
    print(f"device {device}, {torch.get_num_threads()} threads; measured matmul: {measured / 1e9:.1f} GFLOP/s"
          + (f"; datasheet peak {peak / 1e12:.0f} TFLOP/s" if peak else ""))
    print("| depth | mode | tokens/s | achieved GFLOP/s | MFU | vs original nanochat |")
    print("|---|---|---|---|---|---|")
    for depth in args.depths:
        modes = [(False, False, None, "")] + [(True, False, None, "")] * args.compile + [(args.compile, True, None, "")] * args.fp8
        modes += [(args.compile, False, {off: type(RECIPE[off])(0)}, f", {off} off") for off in args.off]
        modes += [(args.compile, False, {on: True}, f", {on} on") for on in args.on]
        for compiled, fp8, options, label in modes:
            tps, flops_per_token = train_throughput(depth, device, compiled, args.steps, args.vocab, args.seq_len, args.batch,
                                                    fp8, options)
            achieved = tps * flops_per_token
            reference_config = (args.vocab, args.seq_len, args.batch) == (8192, 512, 8)
            ref = REFERENCE_TOKENS_PER_SEC.get(depth) if device.type == "cpu" and reference_config else None
            mode = ("compiled" if compiled else "eager") + (" fp8" if fp8 else "") + label
            print(f"| {depth} | {mode} | {tps:,.0f} | {achieved / 1e9:.1f} | "
                  f"{100 * achieved / (peak or measured):.1f}% | {f'{tps / ref:.2f}x' if ref else '-'} |")
    print("\n| data loader (1 rank, B=8, steady state) | tokens/s out | cropped (of tokens tokenized) |")
    print("|---|---|---|")
    for T, packing in [(512, "bestfit"), (2048, "bestfit"), (2048, "concat")]:
        try:
            tps, crop = loader_throughput(T, packing)
        except FileNotFoundError as e:
            print(f"data loader: skipped ({e})")
            break
        print(f"| T={T} {packing} | {tps:,.0f} | {100 * crop:.1f}% |")


if __name__ == "__main__":
    main()
