import contextlib
import io
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def missing(what, install):
    """For a test that needs something the dev install does not bring: skip with one line saying
    what to install, except under CI (CI=true, as .ci/run sets), where nothing may be left out."""
    message = f"{what} is not installed: {install}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


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


@pytest.fixture(scope="session")
def chat_dir(pretrain_dir, tmp_path_factory):
    """A base dir holding the small tokenizer and one randomly initialised depth-2 model saved as
    both a base and an SFT checkpoint (serving does not care what the weights learned); nonzero
    output projections, so its answers depend on the whole context. Its
    stop tokens' logits are 0, mid-pack, so with top-k 50 or greedy it talks until max_tokens."""
    import shutil

    import torch

    from nanochat.checkpoint_manager import PHASE_DIRS, save_checkpoint
    from nanochat.gpt import GPT, config_for_depth
    from nanochat.tokenizer import RustBPETokenizer

    base = tmp_path_factory.mktemp("chat")
    shutil.copytree(pretrain_dir / "tokenizer", base / "tokenizer")
    tokenizer = RustBPETokenizer.from_directory(str(base / "tokenizer"))
    torch.manual_seed(0)
    config = config_for_depth(2, 512, 4096)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():  # output projections (and gates) start at zero: give attention a
            if not p.any():  # say, enough that an answer depends on the turns before the last
                p.normal_(0, 0.05)
        for stop in ("<|assistant_end|>", "<|bos|>"):
            model.lm_head.weight[tokenizer.encode_special(stop)] = 0
    for phase in ("base", "sft"):
        save_checkpoint(str(base / PHASE_DIRS[phase] / "d2"), 7, model, [], {"step": 7, "model_config": vars(config)})
    return base


@pytest.fixture
def chat_env(chat_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(chat_dir))
    return chat_dir


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def chat_server(chat_dir, tmp_path_factory):
    """`python -m scripts.chat_web` really started: 2 workers on a free port; yields its URL."""
    with serve_chat(chat_dir, tmp_path_factory.mktemp("chat_web") / "server.log", "-n", "2") as url:
        yield url


@contextlib.contextmanager
def serve_chat(base_dir, log, *flags, env=None):
    """Start `python -m scripts.chat_web` on a free port over base_dir's models; yields its URL."""
    import requests

    port = free_port()
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), **(env or {})}
    server = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "-m", "200", "-p", str(port), *flags],
                              cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if requests.get(url + "/health", timeout=1).ok:
                break
        except requests.ConnectionError:
            pass
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            pytest.fail(f"chat_web did not start:\n{log.read_text()}")
        time.sleep(0.2)
    try:
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
