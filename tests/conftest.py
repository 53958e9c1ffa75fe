import io
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    """Every test gets its own NANOCHAT_BASE_DIR and starts with no mirror set."""
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.delenv("NANOCHAT_MIRROR", raising=False)
    return base


@pytest.fixture(scope="session")
def shared_mirror():
    """The shared sample mirror: $NANOCHAT_MIRROR as CI exports it, else ../shared/mirror."""
    candidates = [os.environ.get("NANOCHAT_MIRROR"), os.path.join(REPO, "..", "shared", "mirror")]
    for path in candidates:
        if path and os.path.isdir(path):
            return os.path.abspath(path)
    pytest.fail("no data mirror: set NANOCHAT_MIRROR or place the shared mirror at ../shared/mirror")


def make_parquet(num_docs=300, seed=0, row_group_size=64):
    """Bytes of a small shard in the real layout: a `text` column of random documents."""
    rng = np.random.default_rng(seed)
    words = ["data", "model", "token", "grüße", "日本語", "🙂", "loss", "x = 1\n", "  "]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(20, 400)))) for _ in range(num_docs)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": docs}), buf, row_group_size=row_group_size, compression="zstd")
    return buf.getvalue()


def run_module(module, *args, env=None, **kwargs):
    """Run `python -m module args` with the test's environment; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=full_env, capture_output=True, text=True, **kwargs
    )


@pytest.fixture(scope="session")
def pretrain_dir(tmp_path_factory, shared_mirror):
    """A base dir with 4 real shards from the mirror and a small tokenizer (vocab 512) trained on them."""
    import shutil

    from nanochat.dataset import BASE_URL, shard_name
    from nanochat.tokenizer import RustBPETokenizer

    base = tmp_path_factory.mktemp("pretrain")
    remote = os.path.join(shared_mirror, *BASE_URL.split("://")[1].split("/"))
    (base / "base_data").mkdir()
    for i in range(4):
        shutil.copy(os.path.join(remote, shard_name(i)), base / "base_data" / shard_name(i))
    texts = pq.read_table(base / "base_data" / shard_name(0)).column("text").to_pylist()
    RustBPETokenizer.train_from_iterator(iter(texts), 512).save(str(base / "tokenizer"))
    return base


@pytest.fixture
def pretrain_env(pretrain_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(pretrain_dir))
    return pretrain_dir
