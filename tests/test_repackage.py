"""dev/repackage_data_reference.py on a tiny local input."""

import pyarrow.parquet as pq

from conftest import REPO, make_parquet
from nanochat import dataset


def run_repackage(src_glob, out_dir):
    import runpy

    namespace = runpy.run_path(f"{REPO}/dev/repackage_data_reference.py")
    return namespace["repackage"](src_glob, str(out_dir), chars_per_shard=60_000, row_group_size=32)


def test_repackage_shuffles_cuts_and_loads(tmp_path, base_dir):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        (src / f"part_{i}.parquet").write_bytes(make_parquet(num_docs=150, seed=10 + i))
    original = [t for i in range(2) for t in pq.read_table(src / f"part_{i}.parquet").column("text").to_pylist()]

    out = base_dir / "base_data"
    num = run_repackage(str(src / "*.parquet"), out)
    shards = [pq.read_table(out / dataset.shard_name(i)).column("text").to_pylist() for i in range(num)]
    merged = [t for shard in shards for t in shard]
    assert sorted(merged) == sorted(original) and merged != original  # same documents, shuffled
    for shard in shards[:-1]:  # each shard stops at the document that reaches the limit
        assert sum(map(len, shard)) >= 60_000 > sum(map(len, shard[:-1]))
    meta = pq.ParquetFile(out / dataset.shard_name(0)).metadata
    assert meta.row_group(0).num_rows == 32

    run_repackage(str(src / "*.parquet"), tmp_path / "again")  # the fixed seed reproduces the order
    again = [pq.read_table(tmp_path / "again" / dataset.shard_name(i)).column("text").to_pylist() for i in range(num)]
    assert again == shards

    # the loader reads them like downloaded shards
    val = [t for batch in dataset.parquets_iter_batched("val") for t in batch]
    assert val == shards[-1]
