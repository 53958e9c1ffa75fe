"""
The pretraining data: FineWeb-Edu (sample-100BT), repackaged into 1823 shuffled parquet shards.

Library: `list_parquet_files()` and `parquets_iter_batched(split)` read the local shards.
CLI:     python -m nanochat.dataset -n 240 -w 4    # download the first 240 shards
         python -m nanochat.dataset --info         # what the data is, and what is local
         python -m nanochat.dataset --sample 3     # show 3 random documents
"""

import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat.common import get_base_dir, make_parser
from nanochat.download import MIRROR_ENV, DownloadError, download, is_valid_parquet, resolve_url

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
NUM_SHARDS = 1823  # shard_00000 .. shard_01822; the last local one is the validation split

ABOUT = f"""\
Dataset:  FineWeb-Edu, sample-100BT (educational web pages filtered from Common Crawl by
          HuggingFace), repackaged for nanochat: documents shuffled with a fixed seed (42) and
          written as {NUM_SHARDS} parquet shards of ~250M characters each (a `text` column,
          row groups of 1024 documents, zstd). See dev/repackage_data_reference.py.
Split:    every local shard is training data except the last one, which is validation."""


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def data_dir():
    return os.path.join(get_base_dir(), "base_data")


def list_parquet_files(folder=None):
    """Full paths of the local shards, sorted. Hidden partial/lock files are never listed."""
    folder = folder or data_dir()
    if not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if n.endswith(".parquet") and not n.startswith("."))
    return [os.path.join(folder, n) for n in names]


def parquets_iter_batched(split, start=0, step=1):
    """
    Yield the `text` column of each row group (a list of str) of the train or val split.
    `start`/`step` stride over row groups within each shard, so ranks read disjoint data.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    paths = list_parquet_files()
    if len(paths) < 2:
        raise FileNotFoundError(
            f"found {len(paths)} pretraining shard(s) in {data_dir()}, need at least 2 (the last is "
            f"validation); run `python -m nanochat.dataset -n 8` first"
        )
    for path in paths[:-1] if split == "train" else paths[-1:]:
        pf = pq.ParquetFile(path)
        for rg in range(start, pf.num_row_groups, step):
            yield pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()


# ---------------------------------------------------------------------------------------------
# Downloading


def download_shards(indices, workers=4, progress=True):
    """Fetch the given shards in parallel. Returns (fetched, skipped, failed) lists of (index, info)."""
    fetched, skipped, failed = [], [], []
    bar = tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024, desc="downloading", disable=not progress)

    def fetch(i):
        path = os.path.join(data_dir(), shard_name(i))
        try:
            got = download(f"{BASE_URL}/{shard_name(i)}", path, validate=is_valid_parquet, progress=bar)
            (fetched if got else skipped).append((i, os.path.getsize(path)))
        except DownloadError as e:
            failed.append((i, str(e)))
        bar.set_postfix_str(f"{len(fetched) + len(skipped) + len(failed)}/{len(indices)} shards")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fetch, indices))
    bar.close()
    return sorted(fetched), sorted(skipped), sorted(failed)


def _download_main(num, workers):
    indices = range(NUM_SHARDS if num == -1 else num)
    where = os.environ.get(MIRROR_ENV) or "huggingface.co"
    print(f"Downloading {len(indices)} shards from {where} to {data_dir()} with {workers} workers")
    t0 = time.time()
    fetched, skipped, failed = download_shards(indices, workers)
    dt = time.time() - t0
    for i, err in failed:
        print(f"FAILED {shard_name(i)}: {err}", file=sys.stderr)
    nbytes = sum(size for _, size in fetched)
    print(
        f"Done: {len(fetched)} fetched, {len(skipped)} skipped (already valid), {len(failed)} failed; "
        f"{nbytes / 1e6:.1f} MB in {dt:.1f}s ({nbytes / 1e6 / max(dt, 1e-9):.1f} MB/s)"
    )
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# Knowing your data


def _shard_stats(path):
    """(documents, characters) of one shard."""
    table = pq.read_table(path, columns=["text"])
    return table.num_rows, pc.sum(pc.utf8_length(table.column("text"))).as_py() or 0


def _info_main():
    print(ABOUT)
    print(f"Source:   {BASE_URL}")
    if os.environ.get(MIRROR_ENV):
        print(f"Mirror:   {resolve_url(BASE_URL)}  (from {MIRROR_ENV})")
    paths = list_parquet_files()
    print(f"Local:    {len(paths)} of {NUM_SHARDS} shards in {data_dir()}")
    if not paths:
        print("          none yet; run `python -m nanochat.dataset -n 8` to download some")
        return 0
    with ThreadPoolExecutor(max_workers=4) as pool:
        stats = list(pool.map(_shard_stats, paths))
    nbytes = sum(os.path.getsize(p) for p in paths)
    docs, chars = sum(d for d, _ in stats), sum(c for _, c in stats)
    print(f"          {nbytes / 1e6:,.1f} MB on disk, {docs:,} documents, {chars:,} characters")
    print(f"          train: {len(paths) - 1} shards, val: {os.path.basename(paths[-1])}")
    return 0


def _sample_main(k, seed):
    """Print k random documents, each with the shard and row it came from."""
    paths = list_parquet_files()
    if not paths:
        print(f"error: no shards in {data_dir()}; run `python -m nanochat.dataset -n 8` first", file=sys.stderr)
        return 1
    rows = [pq.ParquetFile(p).metadata.num_rows for p in paths]
    rng = random.Random(seed)
    picks = sorted(rng.sample(range(sum(rows)), min(k, sum(rows))))
    for g in picks:
        shard = 0
        while g >= rows[shard]:
            g -= rows[shard]
            shard += 1
        text = pq.read_table(paths[shard], columns=["text"]).column("text")[g].as_py()
        shown = text if len(text) <= 1500 else text[:1500] + f" [... {len(text) - 1500:,} more characters]"
        print(f"===== {os.path.basename(paths[shard])}, row {g} ({len(text):,} characters) =====")
        print(shown, end="\n\n")
    return 0


parser = make_parser(prog="python -m nanochat.dataset", description="Download and inspect the FineWeb-Edu pretraining shards.")
parser.add_argument("-n", "--num_files", type=int, default=-1, help=f"shards to download, -1 = all {NUM_SHARDS}")
parser.add_argument("-w", "--num_workers", type=int, default=4, help="parallel downloads")
parser.add_argument("--info", action="store_true", help="describe the dataset and the local shards")
parser.add_argument("--sample", type=int, metavar="K", help="print K random local documents")
parser.add_argument("--seed", type=int, default=None, help="seed for --sample")


def main(argv=None):
    args = parser.parse_args(argv)
    if args.num_files == 0 or args.num_files < -1 or args.num_files > NUM_SHARDS:
        parser.error(f"-n must be between 1 and {NUM_SHARDS}, or -1 for all; got {args.num_files}")
    if args.num_workers < 1:
        parser.error(f"-w must be at least 1; got {args.num_workers}")
    if args.sample is not None and args.sample < 1:
        parser.error(f"--sample must be at least 1; got {args.sample}")
    if args.info:
        return _info_main()
    if args.sample is not None:
        return _sample_main(args.sample, args.seed)
    return _download_main(args.num_files, args.num_workers)


if __name__ == "__main__":
    sys.exit(main())
