"""The chat tasks on the mirror's real data, and scripts.chat_eval end to end."""

import os
import subprocess
import sys
from decimal import Decimal

import pytest
import torch

from conftest import REPO, run_module
from nanochat.engine import calculator
from nanochat.tokenizer import get_tokenizer
from tasks.arc import ARC
from tasks.common import Task, TaskMixture, TaskSequence
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K, extract_answer, parts_to_solution, solution_parts
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee


@pytest.fixture
def data(chat_dir, shared_mirror, tmp_path, monkeypatch):
    """A fresh base dir with the small tokenizer, fetching task data from the mirror."""
    monkeypatch.setenv("NANOCHAT_MIRROR", shared_mirror)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    os.symlink(chat_dir / "tokenizer", tmp_path / "tokenizer")
    return tmp_path


def wrong_answer(task, conversation):
    if "letters" in conversation:
        return next(letter for letter in conversation["letters"] if letter != conversation["messages"][-1]["content"])
    if isinstance(task, HumanEval):
        return "def nothing():\n    pass\n"
    return "I think it is #### 123456789"


def reference_answer(conversation):
    content = conversation["messages"][-1]["content"]
    return content if isinstance(content, str) else parts_to_solution(content)


@pytest.mark.parametrize("make, rows", [
    (lambda: ARC("ARC-Easy", "train"), 2251), (lambda: ARC("ARC-Easy", "validation"), 570),
    (lambda: ARC("ARC-Easy", "test"), 2376), (lambda: ARC("ARC-Challenge", "test"), 1172),
    (lambda: MMLU("all", "test"), 14042), (lambda: MMLU("all", "dev"), 285), (lambda: MMLU("auxiliary_train", "train"), 285),
    (lambda: GSM8K("train"), 7473), (lambda: GSM8K("test"), 1319), (lambda: HumanEval(), 164),
    (lambda: SpellingBee(300, "train"), 300), (lambda: SimpleSpelling(50, "test"), 50),
])
def test_task_loads_renders_and_grades(data, make, rows):
    task = make()
    assert len(task) == rows
    tokenizer = get_tokenizer()
    for i in (0, rows // 2, rows - 1):
        conversation = task[i]
        ids, mask = tokenizer.render_conversation(conversation, max_tokens=1 << 30)
        assert sum(mask) > 0 and ids[0] == tokenizer.get_bos_token_id()
        assert task.evaluate(conversation, reference_answer(conversation)) == 1
        assert task.evaluate(conversation, wrong_answer(task, conversation)) == 0
    if task.eval_type == "categorical":
        assert all(task[i]["messages"][-1]["content"] in task[i]["letters"] for i in range(0, rows, max(1, rows // 50)))


def test_smoltalk_conversations_render(data):
    tokenizer = get_tokenizer()
    for split, rows in (("train", 899), ("test", 100)):
        task = SmolTalk(split)
        assert len(task) == rows
        for conversation in task:
            tokenizer.render_conversation(conversation)  # raises on a malformed conversation


@pytest.mark.parametrize("text, expected", [
    ("so the answer is\n#### 1,234", Decimal(1234)), ("#### -5", Decimal(-5)), ("#### 3.50", Decimal("3.5")),
    ("#### $18 per day", Decimal(18)), ("#### 7 apples.", Decimal(7)), ("#### .5", Decimal("0.5")),
    ("first #### 3 then #### 4", Decimal(4)), ("the answer is 42", None), ("#### none", None), ("", None),
])
def test_gsm8k_answer_extraction(text, expected):
    assert extract_answer(text) == expected


def test_gsm8k_tool_calls_round_trip_and_compute(data):
    task = GSM8K("test")
    for row in task.rows:
        parts = solution_parts(row["answer"])
        assert parts_to_solution(parts) == row["answer"]
    parts = task[0]["messages"][-1]["content"]
    calls = [(p["text"], q["text"]) for p, q in zip(parts, parts[1:]) if p["type"] == "python"]
    assert calls == [("16-3-4", "9"), ("9*2", "18")]
    assert all(str(calculator(expr)) == out for expr, out in calls)
    assert task.evaluate(task[0], "18") == 0 and task.evaluate(task[0], "so #### 18.0") == 1


def test_spellingbee_counts_are_right_and_splits_disjoint(data):
    train, test = SpellingBee(200, "train"), SpellingBee(200, "test")
    for example in list(train) + list(test):
        parts = example["messages"][-1]["content"]
        call = next(p["text"] for p in parts if p["type"] == "python")
        assert calculator(call) == example["answer"]  # the tool agrees with the spelled-out count
    assert SpellingBee(200, "train")[7] == train[7]  # deterministic
    questions = lambda t: {e["messages"][0]["content"] for e in t}  # noqa: E731
    assert len(questions(train) & questions(test)) < 5  # only chance collisions


def test_slicing_mixture_and_sequence():
    class Numbers(Task):
        def __init__(self, n, tag, **kwargs):
            super().__init__(**kwargs)
            self.n, self.tag = n, tag

        def num_examples(self):
            return self.n

        def get_example(self, index):
            return (self.tag, index)

    assert list(Numbers(10, "a", start=2, stop=9, step=3)) == [("a", 2), ("a", 5), ("a", 8)]
    assert len(Numbers(5, "a", stop=100)) == 5
    with pytest.raises(ValueError):
        Numbers(5, "a", step=0)
    a, b = Numbers(3, "a"), Numbers(2, "b")
    mixture = TaskMixture([a, b, b])
    assert len(mixture) == 7 and sorted(mixture) == sorted(list(a) + list(b) * 2)
    assert list(TaskMixture([a, b, b])) == list(mixture) and list(mixture) != list(a) + list(b) * 2
    assert list(TaskSequence([a, b])) == list(a) + list(b)


def test_customjson_loads_and_reports_bad_lines(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]\n\n'
                    '{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}\n')
    task = CustomJSON(str(good))
    assert len(task) == 2 and task[1]["messages"][1]["content"] == "4"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('[{"role": "user", "content": "hi"}]\n[{"role": "assistant", "content": "first?"}]\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2: roles must alternate"):
        CustomJSON(str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1"):
        CustomJSON(str(bad))


def test_batched_categorical_matches_one_question_at_a_time(data, chat_dir):
    from nanochat.checkpoint_manager import build_model, load_checkpoint, PHASE_DIRS
    from scripts.chat_eval import letter_token, run_categorical

    state, _, meta = load_checkpoint(str(chat_dir / PHASE_DIRS["sft"] / "d2"), 7, "cpu", with_optimizer=False)
    model, tokenizer, task = build_model(state, meta, torch.device("cpu")), get_tokenizer(), ARC("ARC-Challenge", "test")
    indices = list(range(0, 60, 3))
    naive = 0
    for i in indices:
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        logits = model(torch.tensor([prompt]))[0, -1]
        scores = [logits[letter_token(tokenizer, letter)].item() for letter in conversation["letters"]]
        naive += task.evaluate(conversation, conversation["letters"][scores.index(max(scores))])
    assert run_categorical(model, tokenizer, task, indices, 8, "cpu") == naive


def test_chat_eval_one_process_and_two_agree(data, chat_dir):
    env = {"NANOCHAT_BASE_DIR": str(data), "OMP_NUM_THREADS": "1"}
    for phase in ("chatsft_checkpoints",):
        os.symlink(chat_dir / phase, data / phase)
    flags = ["-i", "sft", "-x", "6", "-m", "24", "-b", "4"]
    one = run_module("scripts.chat_eval", *flags, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    lines = [line for line in one.stdout.splitlines() if "/6 = " in line or line.startswith("ChatCORE")]
    assert len(lines) == 7
    report = (data / "report" / "chat-evaluation-sft.md").read_text()
    assert "ChatCORE" in report and "ARC-Easy" in report
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "scripts.chat_eval", "--", *flags], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, **env})
    assert two.returncode == 0, two.stderr[-3000:]
    assert [line for line in two.stdout.splitlines() if "/6 = " in line or line.startswith("ChatCORE")] == lines


def test_chat_eval_bad_task_name_is_a_usage_error(data):
    r = run_module("scripts.chat_eval", "-a", "ARC-Easy|Jeopardy")
    assert r.returncode == 2 and "Jeopardy" in r.stderr
