"""`python -m nanochat.dataset` end to end: real subprocesses, a real local server, real shards."""

import filecmp
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import REPO, make_parquet, run_module
from fault_server import FaultServer
from nanochat import dataset

REMOTE = "/" + dataset.BASE_URL.split("://")[1]  # the URL path under a mirror
SHARDS = [make_parquet(num_docs=200, seed=i) for i in range(4)]


def remote_files(indices=range(4)):
    return {f"{REMOTE}/{dataset.shard_name(i)}": SHARDS[i] for i in indices}


def local_shards(base_dir):
    return sorted(os.listdir(base_dir / "base_data"))


def cli(*args, mirror, **kwargs):
    return run_module("nanochat.dataset", *args, env={"NANOCHAT_MIRROR": mirror}, **kwargs)


def test_missing_shard_fails_but_the_others_land(base_dir):
    with FaultServer(remote_files([0, 1, 3])) as srv:
        r = cli("-n", "4", "-w", "2", mirror=srv.url)
    assert r.returncode == 1
    assert re.search(r"FAILED shard_00002\.parquet: HTTP 404 .*shard_00002\.parquet", r.stderr)
    assert "3 fetched, 0 skipped (already valid), 1 failed" in r.stdout
    assert local_shards(base_dir) == [dataset.shard_name(i) for i in (0, 1, 3)]
    for i in (0, 1, 3):
        assert (base_dir / "base_data" / dataset.shard_name(i)).read_bytes() == SHARDS[i]


def test_valid_shards_skipped_corrupt_ones_refetched(base_dir):
    with FaultServer(remote_files()) as srv:
        assert cli("-n", "3", mirror=srv.url).returncode == 0
        corrupt = base_dir / "base_data" / dataset.shard_name(1)
        corrupt.write_bytes(corrupt.read_bytes()[:-10])  # truncated: footer gone
        r = cli("-n", "3", mirror=srv.url)
        assert r.returncode == 0, r.stderr
        assert "1 fetched, 2 skipped" in r.stdout
        assert len(srv.requests_for(f"{REMOTE}/{dataset.shard_name(1)}")) == 2
        assert len(srv.requests_for(f"{REMOTE}/{dataset.shard_name(0)}")) == 1
    assert corrupt.read_bytes() == SHARDS[1]


def test_two_processes_one_transfer(base_dir):
    with FaultServer(remote_files([0]), rate=200_000) as srv:  # ~1 s per shard
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "nanochat.dataset", "-n", "1"],
                cwd=REPO, env={**os.environ, "NANOCHAT_MIRROR": srv.url},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for _ in range(2)
        ]
        outs = [p.communicate(timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert len(srv.log) == 1
    assert sorted(o[0].split("Done: ")[1][:22] for o in outs) == ["0 fetched, 1 skipped (", "1 fetched, 0 skipped ("]
    assert local_shards(base_dir) == [dataset.shard_name(0)]


def test_killed_mid_transfer_then_rerun(base_dir):
    data_dir = base_dir / "base_data"
    with FaultServer(remote_files([0]), rate=100_000) as srv:
        p = subprocess.Popen(
            [sys.executable, "-m", "nanochat.dataset", "-n", "1"],
            cwd=REPO, env={**os.environ, "NANOCHAT_MIRROR": srv.url},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        partial = data_dir / f".{dataset.shard_name(0)}.partial"
        deadline = time.time() + 30
        while not (partial.exists() and partial.stat().st_size > 0) and time.time() < deadline:
            time.sleep(0.05)
        assert partial.exists(), "the download never started"
        assert dataset.list_parquet_files() == []  # in flight: nothing listed
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert dataset.list_parquet_files() == []
        kept = partial.stat().st_size
        assert 0 < kept < len(SHARDS[0])
        srv.rate = None
        r = cli("-n", "1", mirror=srv.url)
        assert r.returncode == 0, r.stderr
        assert srv.log[-1]["range"] == f"bytes={kept}-"  # resumed, not restarted
    assert os.listdir(data_dir) == [dataset.shard_name(0)]
    assert (data_dir / dataset.shard_name(0)).read_bytes() == SHARDS[0]


def test_real_mirror_shards(base_dir, shared_mirror):
    mirror_dir = os.path.join(shared_mirror, *REMOTE.strip("/").split("/"))
    r = cli("-n", "4", mirror=shared_mirror)
    assert r.returncode == 0, r.stderr
    paths = dataset.list_parquet_files()
    assert [os.path.basename(p) for p in paths] == [dataset.shard_name(i) for i in range(4)]
    for p in paths:
        assert filecmp.cmp(p, os.path.join(mirror_dir, os.path.basename(p)), shallow=False)
    r = cli("-n", "4", mirror=shared_mirror)
    assert "0 fetched, 4 skipped" in r.stdout

    # The train split is shards 0-2, the val split shard 3; two "ranks" striding over row groups
    # see disjoint halves that together are the whole train text.
    whole = [t for p in paths[:-1] for t in pq.read_table(p).column("text").to_pylist()]
    rank0 = [t for batch in dataset.parquets_iter_batched("train", start=0, step=2) for t in batch]
    rank1 = [t for batch in dataset.parquets_iter_batched("train", start=1, step=2) for t in batch]
    assert sorted(rank0 + rank1) == sorted(whole) and not set(rank0) & set(rank1)
    val = [t for batch in dataset.parquets_iter_batched("val") for t in batch]
    assert val == pq.read_table(paths[-1]).column("text").to_pylist()


def test_real_mirror_over_http(base_dir, shared_mirror):
    with FaultServer(root=shared_mirror) as srv:
        srv.faults[f"{REMOTE}/{dataset.shard_name(1)}"] = ["drop", "503"]
        r = cli("-n", "2", mirror=srv.url)
    assert r.returncode == 0, r.stderr
    mirror_dir = os.path.join(shared_mirror, *REMOTE.strip("/").split("/"))
    for p in dataset.list_parquet_files():
        assert filecmp.cmp(p, os.path.join(mirror_dir, os.path.basename(p)), shallow=False)


def test_info_and_sample(base_dir, shared_mirror):
    assert cli("-n", "2", mirror=shared_mirror).returncode == 0
    paths = dataset.list_parquet_files()
    tables = [pq.read_table(p) for p in paths]
    info = cli("--info", mirror=shared_mirror).stdout
    docs = sum(t.num_rows for t in tables)
    chars = sum(len(s) for t in tables for s in t.column("text").to_pylist())
    assert "FineWeb-Edu" in info and "1823" in info and dataset.BASE_URL in info
    assert "2 of 1823 shards" in info
    assert f"{docs:,} documents, {chars:,} characters" in info

    out = cli("--sample", "3", "--seed", "7", mirror=shared_mirror).stdout
    headers = re.findall(r"===== (shard_\d+\.parquet), row (\d+) \(([\d,]+) characters\) =====\n(.{0,200})", out)
    assert len(headers) == 3
    for name, row, nchars, start in headers:
        text = tables[[os.path.basename(p) for p in paths].index(name)].column("text")[int(row)].as_py()
        assert len(text) == int(nchars.replace(",", "")) and text.startswith(start)


@pytest.mark.parametrize("args", [["-n", "0"], ["-n", "1824"], ["-n", "-2"], ["-w", "0"], ["--sample", "0"]])
def test_bad_flags_are_one_line_errors(args):
    r = run_module("nanochat.dataset", *args)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("python -m nanochat.dataset: error: ")
    assert "Traceback" not in r.stderr


def test_no_shards_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="python -m nanochat.dataset"):
        next(dataset.parquets_iter_batched("train"))
    r = run_module("nanochat.dataset", "--sample", "2")
    assert r.returncode == 1 and "python -m nanochat.dataset" in r.stderr
