"""
Train the tokenizer on the pretraining shards.

    python -m scripts.tok_train --max_chars=2000000000 --doc_cap=10000 --vocab_size=65536
"""

import itertools
import os
import time

from tqdm import tqdm

from nanochat.common import get_base_dir, int_flag, make_parser
from nanochat.dataset import parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import RustBPETokenizer

parser = make_parser(description="Train the BPE tokenizer on the pretraining shards.")
parser.add_argument("--max_chars", type=int_flag(1), default=2_000_000_000, help="characters of training text to use")
parser.add_argument("--doc_cap", type=int_flag(1), default=10_000, help="use at most this many characters of each document")
parser.add_argument("--vocab_size", type=int, default=65536, help="vocabulary size, special tokens included")


def text_iterator(batches, max_chars, doc_cap, bar):
    """Documents of the train split, each cut to doc_cap characters, until max_chars in total.
    If the split runs out first, the bar's total becomes what there was (it ends at 100%)."""
    total = 0
    for batch in batches:
        for doc in batch:
            doc = doc[:doc_cap]
            total += len(doc)
            bar.update(len(doc))
            yield doc
            if total >= max_chars:
                return
    bar.total = total
    bar.refresh()


def main():
    args = parser.parse_args()
    print(f"config: {vars(args)}")
    try:
        batches = parquets_iter_batched(split="train")
        batches = itertools.chain([next(batches)], batches)  # no shards: fail here, before any work
        bar = tqdm(total=args.max_chars, unit="char", unit_scale=True, desc="training text")
        t0 = time.time()
        tokenizer = RustBPETokenizer.train_from_iterator(text_iterator(batches, args.max_chars, args.doc_cap, bar), args.vocab_size)
        train_time = time.time() - t0
        bar.close()
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    chars = int(bar.n)
    print(f"trained on {chars:,} characters in {train_time:.2f}s ({chars / train_time / 1e6:.1f}M chars/s)")
    if chars < args.max_chars:
        print(f"that is all the text of the local train shards (--max_chars={args.max_chars:,} asked for more); "
              f"more shards give more: python -m nanochat.dataset -n N")

    folder = os.path.join(get_base_dir(), "tokenizer")
    tokenizer.save(folder)
    reloaded = RustBPETokenizer.from_directory(folder)
    probe = "Hello world! 12345 <|bos|> ünïcødé 日本語 😀\n\tdef f(x): return x**2"
    assert reloaded.decode(reloaded.encode(probe)) == probe, "the saved tokenizer does not round-trip"
    print(f"saved to {folder} (vocab {reloaded.get_vocab_size():,})")

    token_bytes = reloaded.token_bytes()
    real = token_bytes[token_bytes > 0].float()
    get_report().log(section="Tokenizer training", data=[
        vars(args),
        {"train_chars": chars, "train_time_s": train_time,
         "num_special_tokens": len(reloaded.get_special_tokens()),
         "token_bytes_min": int(real.min()), "token_bytes_max": int(real.max()), "token_bytes_mean": float(real.mean())},
    ])


if __name__ == "__main__":
    main()
