"""scripts.base_train and scripts.base_loss end to end, as subprocesses on real shards."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, free_port, run_module
from nanochat.checkpoint_manager import checkpoint_dir, load_model, saved_steps
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.gpt import GPT, config_for_depth
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_token_bytes
from nanochat.training import AUTO_BATCH_SIZES, largest_fitting_batch_size

TINY = ["--depth=2", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=128",
        "--eval_tokens=256", "--sample_every=0", "--core_metric_every=-1"]


def losses(stdout):
    """step -> logged (smoothed) loss, and the final val bpb."""
    steps = {int(m[1]): m[2] for m in re.finditer(r"^step (\d+)/\d+ .*?\| loss: ([\d.]+)", stdout, re.M)}
    bpbs = re.findall(r"val bpb: ([\d.]+)", stdout)
    return steps, bpbs


def test_train_kill_and_resume_is_bit_identical(pretrain_env):
    flags = TINY + ["--num_iterations=20", "--eval_every=10", "--save_every=10"]
    straight = run_module("scripts.base_train", *flags, "--model_tag=straight")
    assert straight.returncode == 0, straight.stderr
    steps, bpbs = losses(straight.stdout)
    assert sorted(steps) == list(range(1, 21))
    assert float(steps[20]) < float(steps[1])  # it learns
    assert "warmdown_ratio=0.5," in straight.stdout and "momentum_cooldown=0.5," in straight.stdout  # the recipe's schedule
    assert saved_steps(checkpoint_dir("base", "straight")) == [10, 20]
    assert "final_val_bpb" in (pretrain_env / "report" / "base-model-training.md").read_text()

    p = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *flags, "--model_tag=killed"],
                         cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = checkpoint_dir("base", "killed")
    deadline = time.time() + 120
    while 10 not in saved_steps(folder) and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert saved_steps(folder) == [10], "the run should have been killed between its checkpoints"
    resumed = run_module("scripts.base_train", *flags, "--model_tag=killed", "--resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    rsteps, rbpbs = losses(resumed.stdout)
    assert sorted(rsteps) == list(range(11, 21))
    assert all(rsteps[s] == steps[s] for s in rsteps)  # same digits: bit-identical training
    assert rbpbs[-1] == bpbs[-1]


def test_sigterm_finishes_the_step_and_saves(pretrain_env):
    p = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *TINY, "--num_iterations=100000", "--eval_every=0",
                          "--model_tag=sigterm"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = ""
    while "step 00003/" not in out:
        line = p.stdout.readline()
        assert line, "training ended early"
        out += line
    p.send_signal(signal.SIGTERM)
    out += p.communicate(timeout=120)[0]
    assert p.returncode == 0
    stopped = int(re.search(r"stopped at step (\d+); continue with the same command plus --resume=auto", out)[1])
    assert saved_steps(checkpoint_dir("base", "sigterm")) == [stopped]


def test_bad_batch_sizes_are_a_clear_error(pretrain_env):
    r = run_module("scripts.base_train", *TINY, "--total_batch_size=100")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: --total_batch_size=100 is not a multiple of")


def test_base_loss_and_bpb_consistency(pretrain_env):
    assert run_module("scripts.base_train", *TINY, "--num_iterations=5", "--eval_every=0", "--model_tag=forloss").returncode == 0
    r = run_module("scripts.base_loss", "--model_tag=forloss", "--split_tokens=512", "--device_batch_size=2")
    assert r.returncode == 0, r.stderr
    train_bpb, val_bpb = (float(re.search(rf"{s} bpb: ([\d.]+)", r.stdout)[1]) for s in ("train", "val"))
    assert 0 < train_bpb < 20 and 0 < val_bpb < 20

    # bpb = (mean loss per counted token) / ln 2 / (mean bytes per counted token), by hand
    model, tok, meta = load_model("base", "cpu", model_tag="forloss")
    assert meta["step"] == 5
    token_bytes = get_token_bytes()
    x, y, _ = next(tokenizing_distributed_data_loader(tok, 4, 64, "val", rank=0, world_size=1))
    y[:, :5] = -1  # ignored targets count for nothing
    with torch.no_grad():
        nats = model(x, y, loss_reduction="none").view(-1)
    flat = y.view(-1)
    counted = (flat >= 0) & (token_bytes[flat.clamp(min=0)] > 0)
    by_hand = nats[counted].mean().item() / math.log(2) / token_bytes[flat[counted]].float().mean().item()
    assert abs(evaluate_bpb(model, iter([(x, y)]), 1, token_bytes) - by_hand) < 1e-5


def test_validation_scores_whole_documents_in_order(pretrain_env):
    """The val bpb that base_train and base_loss report is that of the val shard's documents read
    in order, BOS-separated, cut into consecutive windows of T + 1 tokens: computed here by hand
    from the parquet file, without the loader."""
    import pyarrow.parquet as pq

    from nanochat.dataset import list_parquet_files
    from nanochat.loss_eval import EVAL_LOADER_KWARGS
    from nanochat.tokenizer import get_tokenizer

    tok, token_bytes = get_tokenizer(), get_token_bytes()
    torch.manual_seed(0)
    model = GPT(config_for_depth(2, tok.get_vocab_size(), 64))
    model.init_weights()
    B, T, steps = 2, 64, 3
    texts = pq.read_table(list_parquet_files()[-1]).column("text").to_pylist()[:50]
    stream = [t for ids in tok.encode(texts, prepend="<|bos|>") for t in ids]
    windows = torch.tensor(stream[: steps * B * (T + 1)]).view(steps * B, T + 1)
    x, y = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        nats = model(x, y, loss_reduction="none").view(-1)
    nbytes = token_bytes[y.reshape(-1)]
    by_hand = nats[nbytes > 0].double().sum().item() / math.log(2) / nbytes.sum().item()
    loader = tokenizing_distributed_data_loader(tok, B, T, "val", rank=0, world_size=1, **EVAL_LOADER_KWARGS)
    assert abs(evaluate_bpb(model, loader, steps, token_bytes) - by_hand) < 1e-6


def test_corrupt_or_missing_checkpoint_is_a_clear_error(pretrain_env):
    with pytest.raises(FileNotFoundError, match="no base checkpoints|no checkpoints"):
        load_model("base", "cpu", model_tag="nonexistent")
    assert run_module("scripts.base_train", *TINY, "--num_iterations=1", "--eval_every=0", "--model_tag=corrupt").returncode == 0
    folder = checkpoint_dir("base", "corrupt")
    with open(os.path.join(folder, "model_000001.pt"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="corrupt"):
        load_model("base", "cpu", model_tag="corrupt")
    r = run_module("scripts.base_loss", "--model_tag=corrupt")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: checkpoint step 1")
    # a model trained with an option that was later removed
    assert run_module("scripts.base_train", *TINY, "--num_iterations=1", "--eval_every=0", "--model_tag=removed").returncode == 0
    meta_path = os.path.join(checkpoint_dir("base", "removed"), "meta_000001.json")
    meta = json.load(open(meta_path))
    meta["model_config"]["norm_gains"] = True
    json.dump(meta, open(meta_path, "w"))
    r = run_module("scripts.base_loss", "--model_tag=removed")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        "error: checkpoint's model has options this nanochat does not have (norm_gains); load it with the version that trained it")


def test_a_fresh_run_never_overwrites_or_prunes_another_runs_checkpoints(pretrain_env):
    flags = [*TINY, "--eval_every=0", "--model_tag=stale"]
    assert run_module("scripts.base_train", *flags, "--num_iterations=3", "--save_every=1", "--keep_checkpoints=2").returncode == 0
    folder = checkpoint_dir("base", "stale")
    assert saved_steps(folder) == [2, 3]
    again = run_module("scripts.base_train", *flags, "--num_iterations=1")
    assert again.returncode == 1 and "holds checkpoints of an earlier run" in again.stderr
    assert "Traceback" not in again.stderr and saved_steps(folder) == [2, 3]
    shorter = run_module("scripts.base_train", *flags, "--num_iterations=2", "--resume=auto")
    assert shorter.returncode == 1 and "past this run's 2 steps" in shorter.stderr
    # Pruning only ever removes steps older than the one just saved.
    from nanochat.checkpoint_manager import save_checkpoint
    model, _, meta = load_model("base", "cpu", model_tag="stale", step=3)
    save_checkpoint(folder, 1, model, [], {**meta, "step": 1}, keep=2)
    assert saved_steps(folder) == [1, 2, 3]


def test_two_nodes_train_together(pretrain_env):
    """Two torchrun "nodes" on 127.0.0.1 with one process each, launched with the file path form."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={r}", "--nproc_per_node=1",
                          "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test",
                          "scripts/base_train.py", *TINY, "--total_batch_size=256", "--num_iterations=2", "--eval_every=0",
                          "--model_tag=twonodes"],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    outs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    log = outs[0][0] + outs[1][0]
    assert "world size 2" in outs[0][1] + outs[1][1]
    assert "step 00002/00002" in log
    meta = json.load(open(os.path.join(checkpoint_dir("base", "twonodes"), "meta_000002.json")))
    assert meta["world_size"] == 2 and len(meta["data_state"]) == 2


class RunsOutOfMemory(torch.nn.Module):
    """A real model that raises CUDA's out-of-memory error halfway through the backward pass of any
    batch of more than `limit` rows, after some gradients have already been written."""

    def __init__(self, model, limit):
        super().__init__()
        self.model, self.limit, self.rows, self.tried = model, limit, 0, []
        model.transformer.wte.weight.register_hook(self.maybe_fail)  # its gradient comes last

    def maybe_fail(self, grad):
        if self.rows > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return grad

    def forward(self, x, y):
        self.rows = x.size(0)
        self.tried.append(x.shape)
        return self.model(x, y)


def test_auto_batch_size_takes_the_largest_that_fits_and_leaves_nothing_behind():
    torch.manual_seed(0)
    model = GPT(config_for_depth(2, 256, 32))
    model.init_weights()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = RunsOutOfMemory(model, limit=12)
    found, too_big = largest_fitting_batch_size(probe, AUTO_BATCH_SIZES, 32, torch.device("cpu"), reserve_bytes=1024)
    assert (found, too_big) == (8, [64, 32, 16])
    assert probe.tried == [(64, 32), (32, 32), (16, 32), (8, 32)]  # at the full sequence length
    assert all(p.grad is None for p in model.parameters())  # not even the half-written ones of a failed try
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert largest_fitting_batch_size(RunsOutOfMemory(model, limit=0), [4, 2, 1], 32, torch.device("cpu"), 0) == (None, [4, 2, 1])
    # the optimizer state the probe keeps room for: AdamW's two moments and Muon's momentum, in float32
    adamw, muon = model.setup_optimizers()
    adamw_params = sum(p.numel() for p in model.embeddings() + model.scalars()) + model.lm_head.weight.numel()
    assert len(model.embeddings()) == 2  # the recipe's: the token embedding and one value embedding
    assert len(model.scalars()) == 2  # and the smear's lambda and gate
    assert adamw.state_bytes() == 8 * adamw_params and muon.state_bytes() == 4 * (model.num_params() - adamw_params)


def test_device_batch_size_auto_and_accumulation_train_the_same_model(pretrain_env):
    """--total_batch_size fixes the step; the device batch only decides how it is split. Off CUDA,
    auto takes the largest batch that splits the step, up to the stage's default."""
    flags = [f for f in TINY if not f.startswith("--device_batch_size")] + ["--num_iterations=3", "--eval_every=0"]
    auto = run_module("scripts.base_train", *flags, "--model_tag=auto")  # 128 tokens of 64: 2 rows a step
    assert auto.returncode == 0, auto.stderr
    assert "device batch size: 2 (auto off CUDA" in auto.stdout and "grad accumulation: 1 " in auto.stdout
    split = run_module("scripts.base_train", *flags, "--device_batch_size=1", "--model_tag=split")
    assert split.returncode == 0 and "grad accumulation: 2 " in split.stdout, split.stderr
    whole, halves = losses(auto.stdout)[0], losses(split.stdout)[0]
    assert sorted(whole) == sorted(halves) == [1, 2, 3]
    assert all(abs(float(whole[s]) - float(halves[s])) < 1e-4 for s in whole)
    a, _, _ = load_model("base", "cpu", model_tag="auto")
    b, _, _ = load_model("base", "cpu", model_tag="split")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        # Embedding entries (token and value tables) of rarely seen tokens get Adam's sign-like first
        # steps, which can turn float32 rounding of a near-zero summed gradient into a step of the
        # other sign (in float64 the two agree to 1e-13): a few entries in a thousand, not the table.
        off = (p - q).abs() > 1e-4
        embedding = name.startswith(("value_embeds", "transformer.wte"))
        assert off.float().mean() < (1e-2 if embedding else 1e-12), (name, int(off.sum()))
    bad = run_module("scripts.base_train", *flags, "--device_batch_size=0")
    assert bad.returncode == 2 and "--device_batch_size: expected a positive number or 'auto'" in bad.stderr


def test_recipe_bench_trains_each_configuration_and_tabulates_them(tmp_path, shared_mirror):
    """dev/bench/recipe.py end to end, tiny: its own data and tokenizer, one row per
    configuration and seed (real base_train runs), kept across invocations, and the table."""
    bench = [sys.executable, "dev/bench/recipe.py", "--depths", "1", "--steps", "12", "--rows", "2", "--seq_len", "64",
             "--vocab", "300", "--tok_chars", "300000", "--eval_tokens", "1024", "--base_dir", str(tmp_path / "bench")]
    env = {**os.environ, "NANOCHAT_MIRROR": shared_mirror}
    r = subprocess.run(bench + ["--configs", "baseline", "value_embeds"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "bench" / "recipe_results.jsonl").read_text().splitlines()]
    assert [(row["config"], row["seed"]) for row in rows] == [("baseline", 1), ("baseline", 2), ("value_embeds", 1)]
    logs = {row["config"]: (tmp_path / "bench" / "recipe_logs" / f"{row['config']}_d1_12_T64x2_s{row['seed']}.log").read_text()
            for row in rows}
    assert "value_embeds=True" in logs["value_embeds"] and "value_embeds=False" in logs["baseline"]  # the flags took
    assert rows[0]["val_bpb"] != rows[1]["val_bpb"]  # the seed changes the run
    table = r.stdout[r.stdout.index("| config |"):]
    assert re.search(r"\| baseline \| 2 \| [\d.]+ \| [\d.]+ \| \+0\.0000 \| [\d.]+ \| \d+ \| 1\.00x \|", table)
    assert re.search(r"\| value_embeds \| 1 \| [\d.]+ \| - \| [+-][\d.]+ \| [\d.]+ \| \d+ \| [\d.]+x \|", table)
    assert all(row["doc_start_bpb"] != row["val_bpb"] for row in rows)  # two different val packings

    # Run again with one more configuration: only that one trains, here twice the batch for half the steps.
    r = subprocess.run(bench + ["--configs", "baseline", "value_embeds", "vww_batch_x2"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.count("training ") == 1 and "training vww_batch_x2" in r.stdout
    log = (tmp_path / "bench" / "recipe_logs" / "vww_batch_x2_d1_12_T64x2_s1.log").read_text()
    assert "total_batch_size=256," in log and "num_iterations=6," in log and "step 00006/00006" in log

    # Rows of another length are another cell: the baseline trains again there, and its table is its own.
    r = subprocess.run(bench + ["--seq_len", "32", "--rows", "4", "--configs", "baseline", "--baseline_seeds", "1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.count("training ") == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "max_seq_len=32," in (tmp_path / "bench" / "recipe_logs" / "baseline_d1_12_T32x4_s1.log").read_text()
    assert "depth 1, 12 steps of 4 x 32 tokens" in r.stdout and "| baseline | 1 |" in r.stdout


def test_the_horizon_counts_parameters_without_value_embeddings(pretrain_env):
    """--target_param_data_ratio sets the steps from the parameters less the value embeddings'
    lookup tables (counted here from the model, not from the script's arithmetic)."""
    vocab = get_token_bytes().numel()
    with torch.device("meta"):
        model = GPT(config_for_depth(2, vocab, 64, value_embeds=True))
    tables = sum(t.weight.numel() for t in model.value_embeds.values())
    assert tables > 0
    expected = round(0.004 * (model.num_params() - tables) / 128)
    r = run_module("scripts.base_train", *TINY, "--value_embeds=1", "--target_param_data_ratio=0.004", "--eval_every=-1",
                   "--dry_run=1")
    assert r.returncode == 0, r.stderr
    assert f"parameters: {model.num_params():,} " in r.stdout and f"| steps: {expected:,} |" in r.stdout
    assert sorted(losses(r.stdout)[0]) == list(range(1, expected + 1))


def test_batch_rule_scales_with_the_parameters():
    from scripts.base_train import REFERENCE_BATCH, batch_rule, horizon_params
    config = config_for_depth(20, 65536, 2048)
    with torch.device("meta"):
        reference = horizon_params(GPT(config))
    assert reference == 561247393  # d20 without its value-embedding tables (test_gpt's closed form, gates and smear included)
    assert batch_rule(config, reference) == (REFERENCE_BATCH, 1.0)
    # B ~ N^0.383: 2^(1/0.383) times the parameters doubles the batch; LRs follow as sqrt(B)
    assert batch_rule(config, reference * 2 ** (1 / 0.383)) == (2 * REFERENCE_BATCH, pytest.approx(math.sqrt(2)))
    assert batch_rule(config, reference / 2 ** (2 / 0.383)) == (REFERENCE_BATCH // 4, pytest.approx(0.5))
    small = config_for_depth(4, 65536, 2048, value_embeds=False)  # the reference takes the model's options
    with torch.device("meta"):
        plain = horizon_params(GPT(config_for_depth(20, 65536, 2048, value_embeds=False)))
    assert batch_rule(small, plain) == (REFERENCE_BATCH, 1.0)


def test_window_schedule_doubles_up_to_the_final_window():
    from scripts.base_train import window_schedule
    thirds = [window_schedule(step, 300, 1 / 4, 3) for step in (0, 99, 100, 199, 200, 299, 300)]
    assert thirds == [1 / 16, 1 / 16, 1 / 8, 1 / 8, 1 / 4, 1 / 4, 1 / 4]  # 3 stages, a third of the run each
    assert [window_schedule(step, 10, 0.2, 2) for step in (0, 4, 5, 9)] == [0.1, 0.1, 0.2, 0.2]
    assert {window_schedule(step, 10, 0.125, 1) for step in range(11)} == {0.125}  # no schedule


def test_window_schedule_trains_the_short_window_first_and_keeps_the_final_one(pretrain_env):
    """Depth 2 at T=64: layer 0 is windowed. With --window=0.25 --window_stages=3 the first third of
    the run trains 4-token windows (the same losses as a run at --window=0.0625; at step 1 attention's
    output projections are still 0, so step 2 is the first whose loss a window changes), and the
    model saved has --window's 16."""
    def second_loss(*flags):
        r = run_module("scripts.base_train", *TINY, "--eval_every=0", "--num_iterations=6", *flags)
        assert r.returncode == 0, r.stderr
        return losses(r.stdout)[0][2]

    scheduled = second_loss("--window=0.25", "--window_stages=3", "--model_tag=grow")
    assert scheduled == second_loss("--window=0.0625", "--model_tag=short")
    assert scheduled != second_loss("--window=0.25", "--model_tag=long")
    model, _, _ = load_model("base", "cpu", phase="eval", model_tag="grow")
    assert model.config.window == 0.25 and model.transformer.h[0].attn.window == 16


def test_default_batch_follows_the_rule(pretrain_env):
    flags = [f for f in TINY if not f.startswith("--total_batch_size")]
    r = run_module("scripts.base_train", *flags, "--num_iterations=1", "--eval_every=0", "--model_tag=rule")
    assert r.returncode == 0, r.stderr
    batch, scale = re.search(r"batch rule: ([\d,]+) tokens per step, LRs x ([\d.]+)", r.stdout).groups()
    batch, scale = int(batch.replace(",", "")), float(scale)
    assert batch == 2 ** round(math.log2(batch)) and batch < 2**19 and scale == pytest.approx(math.sqrt(batch / 2**19), abs=1e-3)
    assert f"tokens: {batch:,} " in r.stdout  # the one step trained that many
    with open(os.path.join(checkpoint_dir("base", "rule"), "meta_000001.json")) as f:
        trained = json.load(f)["user_config"]  # what the run used, and what base_loss reads back
    assert trained["total_batch_size"] == batch
    assert trained["matrix_lr"] == pytest.approx(0.02 * scale, rel=1e-3) and trained["embedding_lr"] == pytest.approx(0.2 * scale, rel=1e-3)
