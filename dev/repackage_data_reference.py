"""
How the pretraining shards are made: a reference, not a pipeline stage.

The source is FineWeb-Edu, config sample-100BT: ~100B GPT-2 tokens of educational web pages that
HuggingFace filtered out of Common Crawl, published as parquet files under
https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu (folder sample/100BT/). nanochat's
shards (karpathy/fineweb-edu-100b-shuffle) were made from it in four steps:

1. read the `text` column of every source file (the other columns are dropped);
2. shuffle all documents with a fixed seed (42), so that any prefix of the shards is an unbiased
   sample: downloading 8 shards or 240 gives the same mix of the web, just less or more of it;
3. cut the shuffled stream into shards of ~250M characters (a shard ends with the document that
   reaches the limit), named shard_00000.parquet, shard_00001.parquet, ...;
4. write each shard with row groups of 1024 documents (the unit the loader strides over across
   ranks) and zstd compression, to a temp file renamed into place.

At full size (~400 GB of text) step 2 needs the documents memory-mapped, not in RAM (HuggingFace
`datasets` keeps them in a memory-mapped Arrow cache); this reference does the same steps with
pyarrow for inputs that fit in memory, e.g. a few source files:

    python dev/repackage_data_reference.py --input 'fineweb-edu/sample/100BT/000_0000*.parquet' \\
        --output_dir /tmp/shards --chars_per_shard 250000000
"""

import argparse
import glob
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def load_texts(pattern):
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise SystemExit(f"error: no parquet files match {pattern!r}")
    return pa.concat_arrays([pq.read_table(p, columns=["text"]).column("text").combine_chunks() for p in paths])


def shard_bounds(lengths, chars_per_shard):
    """Split points so each shard ends with the document that brings it to `chars_per_shard`."""
    bounds, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        total += n
        if total >= chars_per_shard:
            bounds.append((start, i + 1))
            start, total = i + 1, 0
    if start < len(lengths):
        bounds.append((start, len(lengths)))
    return bounds


def repackage(pattern, output_dir, chars_per_shard=250_000_000, row_group_size=1024, seed=42):
    texts = load_texts(pattern)
    shuffled = texts.take(pa.array(np.random.default_rng(seed).permutation(len(texts))))
    lengths = pc.utf8_length(shuffled).to_numpy()
    os.makedirs(output_dir, exist_ok=True)
    bounds = shard_bounds(lengths, chars_per_shard)
    for index, (start, stop) in enumerate(bounds):
        path = os.path.join(output_dir, f"shard_{index:05d}.parquet")
        table = pa.table({"text": shuffled.slice(start, stop - start)})
        pq.write_table(table, path + ".tmp", row_group_size=row_group_size, compression="zstd")
        os.replace(path + ".tmp", path)
        print(f"{path}: {stop - start:,} documents, {int(lengths[start:stop].sum()):,} characters")
    return len(bounds)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", required=True, help="glob of source parquet files with a `text` column")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--chars_per_shard", type=int, default=250_000_000)
    parser.add_argument("--row_group_size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    repackage(args.input, args.output_dir, args.chars_per_shard, args.row_group_size, args.seed)
