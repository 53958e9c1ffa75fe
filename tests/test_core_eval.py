"""CORE: prompt rendering, scoring against a scripted model with known preferences, the mirror's
real bundle, and scripts.base_eval end to end (1 process vs 2 under torchrun)."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_module
from nanochat.core_eval import evaluate_core, eval_bundle_dir, load_tasks, render, tokenize
from nanochat.gpt import GPT, GPTConfig, config_for_depth
from nanochat.tokenizer import get_tokenizer

MC = {"query": "Question: 2+2?", "choices": ["4", "5"], "gold": 0}
MC_SHOT = {"query": "Question: 1+1?", "choices": ["3", "2"], "gold": 1}
SCHEMA = {"context_options": ["Tom ate because Tom", "Tom ate because the cake"], "continuation": "was hungry.", "gold": 0}
SCHEMA_SHOT = {"context_options": ["A", "B"], "continuation": "c", "gold": 1}
LM = {"context": "Q: capital of France?", "continuation": "Paris"}
LM_SHOT = {"context": "Q: capital of Italy?", "continuation": "Rome"}


def test_the_three_task_types_render_exactly():
    assert render(MC, "multiple_choice", "\nAnswer: ", [MC_SHOT]) == [
        ("Question: 1+1?\nAnswer: 2\n\nQuestion: 2+2?\nAnswer: ", "4"),
        ("Question: 1+1?\nAnswer: 2\n\nQuestion: 2+2?\nAnswer: ", "5"),
    ]
    assert render(SCHEMA, "schema", " ", [SCHEMA_SHOT]) == [
        ("B c\n\nTom ate because Tom ", "was hungry."),
        ("B c\n\nTom ate because the cake ", "was hungry."),
    ]
    assert render(LM, "language_modeling", "\nA: ", [LM_SHOT, LM_SHOT]) == [
        ("Q: capital of Italy?\nA: Rome\n\nQ: capital of Italy?\nA: Rome\n\nQ: capital of France?\nA: ", "Paris"),
    ]
    assert render(MC, "multiple_choice", " ", []) == [("Question: 2+2? ", "4"), ("Question: 2+2? ", "5")]


def test_tokenize_moves_trailing_space_to_the_continuation_and_crops_left(chat_env):
    tok = get_tokenizer()
    [(ids, start, end)] = tokenize(tok, [("Answer: ", "Paris")], max_len=1000)
    assert ids == [tok.get_bos_token_id(), *tok.encode("Answer:"), *tok.encode(" Paris")]
    assert tok.decode(ids[start:end]) == " Paris" and end == len(ids)
    [(cropped, s, e)] = tokenize(tok, [("a long context " * 20, "Paris")], max_len=10)
    assert len(cropped) == 10 and tok.decode(cropped[s:e]) == " Paris"


class ScriptedModel(torch.nn.Module):
    """Knows the answer exactly when the last block of its input (after the last blank line) holds
    a "★": there it predicts every next token with certainty; elsewhere all tokens are equally likely."""

    def __init__(self, tokenizer, sequence_len=4096):
        super().__init__()
        self.tokenizer, self.config = tokenizer, GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.get_vocab_size())

    def forward(self, ids):
        B, T = ids.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            text = self.tokenizer.decode(ids[b].tolist()).replace("<|bos|>", "")
            if "★" in text.split("\n\n")[-1]:
                logits[b, torch.arange(T - 1), ids[b, 1:]] = 30.0
        return logits


def write_bundle(folder, tasks):
    """A small eval bundle in the real layout: tasks = [(label, type, fewshot, baseline %, items)]."""
    os.makedirs(folder / "eval_data" / "scripted")
    lines = ["icl_tasks:"]
    with open(folder / "eval_meta_data.csv", "w") as f:
        f.write("Eval Task,Random baseline\n")
        for label, kind, shots, baseline, items in tasks:
            lines += ["-", f"  label: {label}", f"  dataset_uri: scripted/{label}.jsonl", f"  num_fewshot: [{shots}]",
                      f"  icl_task_type: {kind}", '  continuation_delimiter: "\\nAnswer: "']
            f.write(f"{label},{baseline}\n")
            (folder / "eval_data" / "scripted" / f"{label}.jsonl").write_text("\n".join(json.dumps(i) for i in items))
    (folder / "core.yaml").write_text("\n".join(lines) + "\n")


@pytest.fixture
def eval_base(chat_dir, tmp_path, monkeypatch):
    """A fresh base dir with the small tokenizer."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    os.symlink(chat_dir / "tokenizer", tmp_path / "tokenizer")
    return tmp_path


def test_scores_match_hand_computed_accuracies(eval_base):
    base = eval_base
    mc = [  # the starred choice is gold in items 0, 1, 3; item 2 stars a wrong one; item 4 stars none (tie: the first)
        {"query": "q0", "choices": ["★ yes", "no", "no", "no"], "gold": 0},
        {"query": "q1", "choices": ["no", "no", "★ yes", "no"], "gold": 2},
        {"query": "q2", "choices": ["no", "★ no", "yes", "no"], "gold": 2},
        {"query": "q3", "choices": ["no", "no", "no", "★"], "gold": 3},
        {"query": "q4", "choices": ["a", "b", "c", "d"], "gold": 1},
    ]
    schema = [  # 2 of 4 right
        {"context_options": ["★ one", "two"], "continuation": "end", "gold": 0},
        {"context_options": ["one", "★ two"], "continuation": "end", "gold": 0},
        {"context_options": ["one", "★ two"], "continuation": "end", "gold": 1},
        {"context_options": ["one", "two"], "continuation": "end", "gold": 1},
    ]
    lm = [  # with 2-shot prompts; reproduced exactly only where the item itself is starred: 3 of 5
        {"context": "c0 ★", "continuation": "alpha"}, {"context": "c1", "continuation": "beta ★"},
        {"context": "c2", "continuation": "gamma"}, {"context": "★", "continuation": "delta"},
        {"context": "c4", "continuation": "epsilon"},
    ]
    bundle = base / "eval_bundle"
    write_bundle(bundle, [("mc", "multiple_choice", 0, 25, mc), ("schema", "schema", 0, 50, schema),
                          ("lm", "language_modeling", 2, 0, lm)])
    assert [t["label"] for t in load_tasks(str(bundle))] == ["mc", "schema", "lm"]
    tok = get_tokenizer()
    for sequence_len in (4096, 24):  # 24 tokens: few-shot examples cropped away, each item's own block kept
        results = evaluate_core(ScriptedModel(tok, sequence_len), tok, "cpu")
        r = results["tasks"]
        assert r["mc"]["accuracy"] == 3 / 5 and math.isclose(r["mc"]["centered"], (0.6 - 0.25) / 0.75)
        assert r["schema"]["accuracy"] == 2 / 4 and r["schema"]["centered"] == 0
        assert r["lm"]["accuracy"] == 3 / 5 and r["lm"]["centered"] == 3 / 5
        assert math.isclose(results["core"], ((0.6 - 0.25) / 0.75 + 0 + 0.6) / 3)


@pytest.fixture
def mirrored(shared_mirror, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", shared_mirror)


def test_fresh_model_scores_near_chance_on_the_real_bundle(eval_base, mirrored):
    bundle = eval_bundle_dir()
    assert len(load_tasks(bundle)) == 18
    assert not [n for n in os.listdir(eval_base) if n.startswith(".eval_bundle")]  # no staging left
    mtime = os.path.getmtime(os.path.join(bundle, "core.yaml"))
    assert eval_bundle_dir() == bundle and os.path.getmtime(os.path.join(bundle, "core.yaml")) == mtime  # unpacked once
    tok = get_tokenizer()
    torch.manual_seed(0)
    model = GPT(config_for_depth(2, tok.get_vocab_size(), 256))
    model.init_weights()
    model.eval()
    results = evaluate_core(model, tok, "cpu", max_per_task=24)
    assert all(r["items"] == 24 for r in results["tasks"].values())
    assert abs(results["core"]) < 0.1, results


def read_csv(folder):
    [name] = os.listdir(folder)
    with open(os.path.join(folder, name)) as f:
        return name, list(csv.reader(f))


def test_base_eval_one_process_and_two_agree(pretrain_env, mirrored, tmp_path):
    flags = ["--depth=2", "--max_seq_len=128", "--device_batch_size=2", "--total_batch_size=256",
             "--eval_tokens=256", "--sample_every=0", "--num_iterations=3", "--eval_every=0", "--model_tag=coretest",
             "--core_metric_every=3", "--core_metric_max_per_task=2"]
    train = run_module("scripts.base_train", *flags)
    assert train.returncode == 0 and "step 00003 | CORE: " in train.stdout, train.stderr[-2000:]
    one = run_module("scripts.base_eval", "-g", "coretest", "--max_per_task=6")
    assert one.returncode == 0, one.stderr
    assert "CORE" in one.stdout and "arc_easy" in one.stdout
    name, single = read_csv(pretrain_env / "base_eval")
    assert name == "base_coretest_000003.csv" and single[-1][0] == "CORE" and len(single) == 18 + 2
    report = (pretrain_env / "report" / "base-model-evaluation.md").read_text()
    assert f"- CORE: {float(single[-1][3]):.6g}"[:12] in report
    os.remove(pretrain_env / "base_eval" / name)

    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "scripts.base_eval", "--", "-g", "coretest", "--max_per_task=6"],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    _, double = read_csv(pretrain_env / "base_eval")
    assert double == single
