"""
Decoding speed: the Engine's KV cache vs recomputing the whole sequence each step (GPT.generate),
at prompt lengths 128 and 1024; batched sampling throughput for num_samples 1/8/32; time to first
token. A randomly initialised depth-4 model (speed does not depend on the weights).

    python dev/bench/inference.py [--depth 4] [--new_tokens 32]
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanochat.engine import Engine  # noqa: E402
from nanochat.gpt import GPT, config_for_depth  # noqa: E402
from nanochat.tokenizer import RustBPETokenizer  # noqa: E402


def build(depth, seq_len=2048):
    g = torch.Generator().manual_seed(0)  # random lowercase words: plenty of pairs to merge
    letters = (torch.randint(0, 26, (400_000,), generator=g) + ord("a")).tolist()
    text = "".join(chr(c) if i % 7 else " " for i, c in enumerate(letters))
    tok = RustBPETokenizer.train_from_iterator(iter([text]), 4096)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config_for_depth(depth, tok.get_vocab_size(), seq_len))
    model.to_empty(device="cpu")
    model.init_weights()
    model.lm_head.weight.data.normal_(std=0.5)
    return model.eval(), tok


def prompt(tok, length):
    g = torch.Generator().manual_seed(length)
    specials = len(tok.get_special_tokens())
    return torch.randint(0, tok.get_vocab_size() - specials, (length,), generator=g).tolist()


def engine_decode(engine, ids, new_tokens, num_samples=1):
    """(time to first token, decode tokens/s over all rows after the first token)."""
    t0 = time.time()
    steps = engine.generate(ids, num_samples=num_samples, max_tokens=new_tokens, temperature=1.0, top_k=50)
    next(steps)
    ttft = time.time() - t0
    t1, n = time.time(), 0
    for _ in steps:
        n += 1
    return ttft, n * num_samples / max(time.time() - t1, 1e-9)


def reference_decode(model, ids, new_tokens):
    steps = model.generate(ids, new_tokens, temperature=1.0, top_k=50)
    next(steps)
    t1, n = time.time(), 0
    for _ in steps:
        n += 1
    return n / (time.time() - t1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=32)
    args = parser.parse_args()
    model, tok = build(args.depth)
    engine = Engine(model, tok)
    print(f"depth {args.depth}, vocab {tok.get_vocab_size()}, {torch.get_num_threads()} threads, {args.new_tokens} new tokens")
    print("| prompt | KV cache tok/s | no cache tok/s | cache speedup | time to first token |")
    print("|---|---|---|---|---|")
    for length in (128, 1024):
        ids = prompt(tok, length)
        ttft, cached = engine_decode(engine, ids, args.new_tokens)
        uncached = reference_decode(model, ids, args.new_tokens)
        print(f"| {length} | {cached:,.1f} | {uncached:,.1f} | {cached / uncached:.1f}x | {ttft * 1000:.0f} ms |")
    print("\n| num_samples (prompt 128) | tokens/s, all rows | time to first token |")
    print("|---|---|---|")
    for n in (1, 8, 32):
        ttft, tps = engine_decode(engine, prompt(tok, 128), args.new_tokens, num_samples=n)
        print(f"| {n} | {tps:,.1f} | {ttft * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
