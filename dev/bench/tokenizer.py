"""
Tokenizer training and encoding, ours vs HuggingFace `tokenizers` vs the PyPI `rustbpe`, on the
same text (the first --mb MB of the local train shards), the same vocab sizes and split pattern,
and the same thread count. Each contender runs in its own subprocess so its peak memory is its own.

    python -m nanochat.dataset -n 16            # shards to read the text from
    pip install tokenizers && pip install --target ~/.cache/nanochat-peers/rustbpe rustbpe==0.1.0
    python dev/bench/tokenizer.py [--mb 50] [--vocab 32768 65536] [--threads 2]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
from nanochat.common import make_parser  # noqa: E402


def load_text(mb):
    from nanochat.dataset import parquets_iter_batched

    texts, total = [], 0
    for batch in parquets_iter_batched("train"):
        for doc in batch:
            texts.append(doc)
            total += len(doc.encode("utf-8"))
            if total >= mb * 1e6:
                return texts
    raise SystemExit(f"error: only {total / 1e6:.1f} MB in the local train shards; download more with `python -m nanochat.dataset -n N`")


def train_ours(texts, vocab):
    import rustbpe
    from nanochat.tokenizer import SPLIT_PATTERN

    tok = rustbpe.Tokenizer()
    t0 = time.time()
    tok.train_from_iterator(iter(texts), vocab, pattern=SPLIT_PATTERN)
    return time.time() - t0, tok


def train_pypi_rustbpe(texts, vocab):
    from peers import load_pypi_rustbpe
    from nanochat.tokenizer import SPLIT_PATTERN

    module = load_pypi_rustbpe()
    if module is None:
        return None, None
    tok = module.Tokenizer()
    t0 = time.time()
    tok.train_from_iterator(iter(texts), vocab, pattern=SPLIT_PATTERN)
    return time.time() - t0, tok


def train_hf(texts, vocab):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from nanochat.tokenizer import SPLIT_PATTERN

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t0 = time.time()
    tok.train_from_iterator((texts[i : i + 1000] for i in range(0, len(texts), 1000)), trainer)  # batches: HF's fast path
    return time.time() - t0, tok


def encode_mbps(name, tok, texts, threads):
    """Batch-encode throughput: ours through tiktoken built from the exported ranks, HF natively."""
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    if name == "ours":
        import tiktoken

        enc = tiktoken.Encoding("bench", pat_str=tok.get_pattern(), mergeable_ranks=dict(tok.get_mergeable_ranks()), special_tokens={})
        t0 = time.time()
        enc.encode_ordinary_batch(texts, num_threads=threads)
    elif name == "hf":
        t0 = time.time()
        tok.encode_batch(texts, add_special_tokens=False)
    else:
        return None
    return nbytes / 1e6 / (time.time() - t0)


def worker(name, mb, vocab, threads, encode_mb):
    texts = load_text(mb)
    train = {"ours": train_ours, "rustbpe": train_pypi_rustbpe, "hf": train_hf}[name]
    seconds, tok = train(texts, vocab)
    result = {"train_s": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if tok is not None:
        result["encode_mbps"] = encode_mbps(name, tok, load_text(encode_mb), threads)
    print(json.dumps(result))


def run(name, args, vocab):
    env = {**os.environ, "RAYON_NUM_THREADS": str(args.threads), "RAYON_RS_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--worker", name, "--mb", str(args.mb), "--vocab", str(vocab),
           "--threads", str(args.threads), "--encode_mb", str(args.encode_mb)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{name} failed: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    parser = make_parser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--encode_mb", type=float, default=10)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.mb, args.vocab[0], args.threads, args.encode_mb)

    print(f"text: first {args.mb} MB of the local train shards; threads: {args.threads}")
    for vocab in args.vocab:
        results = {name: run(name, args, vocab) for name in ("ours", "rustbpe", "hf")}
        ours = results["ours"]
        print(f"\nvocab {vocab}")
        print("| tokenizer | train s | peak MB | encode MB/s | ours faster at training |")
        print("|---|---|---|---|---|")
        for name, r in results.items():
            if r["train_s"] is None:
                print(f"| {name} | not installed (see this file's docstring) | | | |")
                continue
            enc = f"{r['encode_mbps']:.1f}" if r.get("encode_mbps") else "-"
            print(f"| {name} | {r['train_s']:.2f} | {r['peak_mb']:.0f} | {enc} | {r['train_s'] / ours['train_s']:.2f}x |")
        if results["hf"].get("encode_mbps"):
            print(f"encode: ours (tiktoken) is {ours['encode_mbps'] / results['hf']['encode_mbps']:.2f}x HF's throughput")


if __name__ == "__main__":
    main()
