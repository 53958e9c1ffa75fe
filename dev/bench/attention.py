"""
The attention kernels of a training step at the speedrun's shape (depth 20: 10 heads of 128, 2048
tokens, bf16), forward + backward, on one CUDA GPU:

- SDPA with is_causal (FlashAttention): the full-context layers' kernel, the reference;
- flex_attention on the same causal mask: what flex costs where flash could run;
- flex_attention on the band of the windowed layers (gpt.attention_blocks: three layers in
  four), with its default kernel, with each of a few kernel_options, and autotuned
  (mode="max-autotune-no-cudagraphs"; inductor logs the configurations it tried, with their times).

Each row: milliseconds per forward + backward, TFLOP/s over the work the mask leaves (4 * head_dim
FLOPs per kept (query, key) pair forward, 2.5x that backward), and that rate against the
reference's. A windowed layer that ran at flash's rate would take (its pairs / causal pairs) of
the reference's time; the last column says how far it is from that.

    python dev/bench/attention.py [--batch 32] [--seq_len 2048] [--window 0.125] [--repeats 20]
"""

import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanochat.common import make_parser  # noqa: E402
from nanochat.gpt import RECIPE, attention_blocks  # noqa: E402

# kernel_options worth a row: BLOCKS_ARE_CONTIGUOUS holds for a band (each query block's key blocks
# are one run); PRESCALE_QK folds the score scale into q (a little less exact); USE_TMA is Hopper's
# tensor-memory loads. (ROWS_GUARANTEED_SAFE does not hold for a band: see its docstring.)
OPTIONS = {"contiguous": {"BLOCKS_ARE_CONTIGUOUS": True}, "prescale": {"PRESCALE_QK": True}, "tma": {"USE_TMA": True}}


def kept_pairs(T, window):
    """(query, key) pairs a causal mask keeps, or a band of `window` keys (itself included)."""
    if not window:
        return T * (T + 1) // 2
    return window * (window + 1) // 2 + (T - window) * window


def seconds_per_call(fn, q, k, v, repeats):
    """Forward + backward of fn, after three calls that compile and warm it."""
    grad = torch.randn_like(q)
    for _ in range(3):
        fn(q, k, v).backward(grad)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(q, k, v).backward(grad)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def flex(block_mask, mode=None, **kernel_options):
    from torch.nn.attention.flex_attention import flex_attention
    torch._dynamo.reset()  # each variant compiles afresh (kernel_options are baked into the kernel)
    compiled = torch.compile(flex_attention, dynamic=False, mode=mode)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, kernel_options=kernel_options or None)


def main():
    parser = make_parser(__doc__)
    parser.add_argument("--batch", type=int, default=32, help="rows (the speedrun's device batch)")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=10)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--window", type=float, default=RECIPE["window"], help="the band, a fraction of seq_len (the recipe's)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no_autotune", action="store_true", help="skip the autotuned row (it compiles for minutes)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: dev/bench/attention.py times CUDA kernels and no CUDA device is visible; run it on a GPU")

    B, H, T, D = args.batch, args.heads, args.seq_len, args.head_dim
    window = max(1, round(args.window * T))
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    causal_mask = attention_blocks(T, T, 0, None, "cuda")
    band = attention_blocks(T, T, window, None, "cuda")
    rows = [("sdpa causal (flash)", 0, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
            ("flex causal", 0, flex(causal_mask)),
            (f"flex band {window}", window, flex(band))]
    rows += [(f"flex band {window}, {name}", window, flex(band, **options)) for name, options in OPTIONS.items()]
    if not args.no_autotune:
        rows.append((f"flex band {window}, autotuned", window, flex(band, mode="max-autotune-no-cudagraphs")))

    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | B={B} heads={H} T={T} head_dim={D} bf16\n")
    print("| kernel | ms fwd+bwd | TFLOP/s (kept pairs) | rate vs flash | time vs flash at its rate |")
    print("|---|---|---|---|---|")
    reference = None
    for name, w, fn in rows:
        try:
            seconds = seconds_per_call(fn, q, k, v, args.repeats)
        except Exception as e:  # an option this torch or GPU lacks: say so, time the rest
            print(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | | |")
            continue
        rate = 3.5 * 4 * D * kept_pairs(T, w) * B * H / seconds / 1e12
        reference = reference or (seconds, rate)
        ideal = reference[0] * kept_pairs(T, w) / kept_pairs(T, 0)
        print(f"| {name} | {seconds * 1e3:.2f} | {rate:.0f} | {rate / reference[1]:.2f}x | {seconds / ideal:.2f}x |")


if __name__ == "__main__":
    main()
