"""
Download throughput: `python -m nanochat.dataset` with 1 worker vs 4, against a local HTTP server
that throttles each connection (as CDNs do), on the same shards in one run.

    python dev/bench/download.py [--shards 8] [--mb 2] [--rate_mbps 2]
"""

import io
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from nanochat.common import make_parser  # noqa: E402
from nanochat.dataset import BASE_URL, shard_name  # noqa: E402
from tests.fault_server import FaultServer  # noqa: E402


def random_shard(mb, seed):
    """A valid shard of about `mb` MB: incompressible text so the size on the wire is real."""
    rng = np.random.default_rng(seed)
    docs = [rng.bytes(50_000).hex() for _ in range(int(mb * 1e6 / 100_000) + 1)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": docs}), buf, compression="zstd")
    return buf.getvalue()


def timed_download(server_url, num_shards, workers):
    with tempfile.TemporaryDirectory() as base:
        env = {**os.environ, "NANOCHAT_MIRROR": server_url, "NANOCHAT_BASE_DIR": base}
        t0 = time.time()
        r = subprocess.run(
            [sys.executable, "-m", "nanochat.dataset", "-n", str(num_shards), "-w", str(workers)],
            cwd=REPO, env=env, capture_output=True, text=True,
        )
        dt = time.time() - t0
        if r.returncode != 0:
            raise SystemExit(f"download failed: {r.stderr.strip().splitlines()[-1]}")
    return dt


def main():
    parser = make_parser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--mb", type=float, default=2.0, help="size of each shard")
    parser.add_argument("--rate_mbps", type=float, default=2.0, help="per-connection limit, MB/s")
    args = parser.parse_args()

    remote = "/" + BASE_URL.split("://")[1]
    files = {f"{remote}/{shard_name(i)}": random_shard(args.mb, i) for i in range(args.shards)}
    total_mb = sum(map(len, files.values())) / 1e6
    print(f"{args.shards} shards, {total_mb:.1f} MB, server limit {args.rate_mbps} MB/s per connection")
    with FaultServer(files, rate=args.rate_mbps * 1e6) as srv:
        times = {w: timed_download(srv.url, args.shards, w) for w in (1, 4)}
    for w, dt in times.items():
        print(f"-w {w}: {dt:6.2f} s  {total_mb / dt:6.2f} MB/s")
    print(f"ratio -w 4 vs -w 1: {times[1] / times[4]:.2f}x faster")


if __name__ == "__main__":
    main()
