"""The chat training stages: loss masking, packing, RL math, and base -> mid -> sft -> rl end to end."""

import re

import pytest
import torch
import torch.nn.functional as F

from conftest import run_module
from nanochat.chat_batches import ConversationPacker, packed_batch, sft_batch
from nanochat.gpt import GPT, config_for_depth
from nanochat.optim import step_optimizers
from nanochat.tokenizer import get_tokenizer
from scripts.chat_rl import policy_gradient_loss, rollout_batches
from tasks.customjson import IDENTITY_CONVERSATIONS, CustomJSON


def tiny_model(vocab, seq_len=128, seed=0):
    torch.manual_seed(seed)
    model = GPT(config_for_depth(2, vocab, seq_len))
    model.init_weights()
    with torch.no_grad():  # nonzero output projections: every position matters
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return model


def conversation(user, assistant):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def test_sft_loss_and_gradients_come_only_from_assistant_tokens(chat_env):
    tok = get_tokenizer()
    convs = [conversation("What is 2+2?", "It is 4."), conversation("Say something much longer, please.", "ok")]
    x, y = sft_batch(convs, tok, 64, tok.get_bos_token_id(), "cpu")
    # Targets are exactly the tokens the render mask marks, at their positions; padding is never a target.
    for r, c in enumerate(convs):
        ids, mask = tok.render_conversation(c)
        expected = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert y[r].tolist() == expected + [-1] * (y.size(1) - len(expected))
        assert x[r, : len(ids) - 1].tolist() == ids[:-1]

    model = tiny_model(tok.get_vocab_size())
    loss = model(x, y)  # the training path (chunked on CPU)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    # By hand: mean negative log-likelihood over the target positions only.
    logp = F.log_softmax(model(x), dim=-1)
    valid = y >= 0
    by_hand = -logp[valid].gather(1, y[valid][:, None]).mean()
    assert torch.allclose(loss, by_hand, atol=1e-5)
    hand_grads = torch.autograd.grad(by_hand, list(model.parameters()))
    for g, h in zip(grads, hand_grads):
        assert torch.allclose(g, h, atol=1e-6)
    # Whatever sits in masked or padded positions of the inputs' future changes nothing before them.
    x2 = x.clone()
    x2[0, -1] = 7  # a padding position of the short row
    assert torch.allclose(model(x2, y), loss)


def test_packing_keeps_conversations_whole_and_uses_each_once(chat_env):
    tok = get_tokenizer()
    data = CustomJSON(IDENTITY_CONVERSATIONS)
    T = 128
    for rank in range(2):
        packer = ConversationPacker(data, tok, T, rank=rank, world_size=2, buffer_size=16)
        placed, rows = [], 0
        while (item := packer.next_row()) is not None:
            row, n, members = item
            assert n == len(row) <= T + 1
            assert row == [t for i in members for t in tok.render_conversation(data[i], max_tokens=T + 1)[0]]
            placed += members
            rows += 1
        assert sorted(placed) == list(range(rank, len(data), 2))  # this rank's share, each exactly once
        assert ConversationPacker(data, tok, T, rank=rank, world_size=2, buffer_size=16).count_rows() == rows


def test_packer_resumes_exactly(chat_env):
    tok = get_tokenizer()
    data = CustomJSON(IDENTITY_CONVERSATIONS)
    straight = ConversationPacker(data, tok, 96, buffer_size=8)
    first = [packed_batch(straight, 4, 0, "cpu") for _ in range(3)]
    state = straight.state()
    rest = [packed_batch(straight, 4, 0, "cpu") for _ in range(5)]
    resumed = ConversationPacker(data, tok, 96, buffer_size=8, state=state)
    again = [packed_batch(resumed, 4, 0, "cpu") for _ in range(5)]
    for (x1, y1), (x2, y2) in zip(rest, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x, y = first[0]
    assert ((y[:, :-1] == -1) | (y[:, :-1] == x[:, 1:])).all()  # targets are the next tokens, or nothing


class ScriptedEngine:
    """Returns fixed samples: prompt + answer tokens, with mask 0 on a forced tool output token."""

    def __init__(self, tokenizer, answers, forced_at):
        self.tokenizer, self.answers, self.forced_at = tokenizer, answers, forced_at
        self.model = type("M", (), {"config": type("C", (), {"sequence_len": 1000})})()

    def generate_many(self, prompts, num_samples, **kwargs):
        answers = self.answers[:num_samples]
        return [([p + a for a in answers], [[0] * len(p) + [0 if j == self.forced_at else 1 for j in range(len(a))]
                                            for a in answers]) for p in prompts]


class RewardTask:
    """Reward 1 for answers that decode to a text containing 'yes'."""

    def __getitem__(self, i):
        return conversation("Is it?", "yes")

    def reward(self, conversation, response):
        return float("yes" in response)


def test_rl_advantages_masks_and_normalisation(chat_env):
    tok = get_tokenizer()
    answers = [tok.encode("yes indeed"), tok.encode("no way"), tok.encode("yes"), tok.encode("nope nope")]
    engine = ScriptedEngine(tok, answers, forced_at=1)
    args = type("A", (), {"max_new_tokens": 50, "num_samples": 4, "temperature": 1.0, "top_k": 50})()
    batches, rewards = rollout_batches(engine, RewardTask(), [0], args, batch_size=3, rollout_rows=None, seed=0)
    assert rewards == [1.0, 0.0, 1.0, 0.0]
    assert [len(b[0]) for b in batches] == [3, 1]
    advantages = torch.cat([b[2] for b in batches])
    assert advantages.tolist() == [0.5, -0.5, 0.5, -0.5]  # reward minus the problem's mean
    prompt = tok.render_for_completion(RewardTask()[0])
    for (x, y, _), rows in zip(batches, [answers[:3], answers[3:]]):
        for r, answer in enumerate(rows):
            # targets: the sampled answer tokens only (not the prompt, not the forced token at index 1)
            expected = [-1] * (len(prompt) - 1) + [t if j != 1 else -1 for j, t in enumerate(answer)]
            assert y[r].tolist() == expected + [-1] * (y.size(1) - len(expected))

    model = tiny_model(tok.get_vocab_size())
    num_tokens = sum(int((y >= 0).sum()) for _, y, _ in batches)
    total = sum(policy_gradient_loss(model, x, y, a, num_tokens) for x, y, a in batches)
    by_hand = 0.0
    for x, y, a in batches:
        logp = F.log_softmax(model(x), dim=-1)
        for r in range(len(a)):
            for t in range(y.size(1)):
                if y[r, t] >= 0:
                    by_hand -= a[r].item() * logp[r, t, y[r, t]].item()
    assert abs(total.item() - by_hand / num_tokens) < 1e-5


def test_batched_rollouts_equal_one_problem_at_a_time(chat_env, shared_mirror, monkeypatch):
    """Greedy RL rollouts of 6 GSM8K problems sampled all at once, or one problem per batch: the
    same micro-batches (rows, targets, advantages) and rewards, so the same losses."""
    monkeypatch.setenv("NANOCHAT_MIRROR", shared_mirror)
    from nanochat.engine import Engine
    from tasks.gsm8k import GSM8K

    tok = get_tokenizer()
    model = tiny_model(tok.get_vocab_size(), seq_len=512).eval()
    engine, task = Engine(model, tok), GSM8K("test")
    args = type("A", (), {"max_new_tokens": 16, "num_samples": 2, "temperature": 0.0, "top_k": 50})()
    indices = [3, 1, 4, 15, 9, 2]
    together = rollout_batches(engine, task, indices, args, batch_size=5, rollout_rows=None, seed=0)
    one_by_one = rollout_batches(engine, task, indices, args, batch_size=5, rollout_rows=2, seed=0)
    assert together[1] == one_by_one[1]
    assert len(together[0]) == len(one_by_one[0]) == 3  # 12 rows in micro-batches of 5
    for (x1, y1, a1), (x2, y2, a2) in zip(together[0], one_by_one[0]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(a1, a2)
    assert (together[0][0][1] >= 0).sum() > 0  # the sampled tokens are targets


def test_one_rl_step_raises_the_rewarded_sample(chat_env):
    tok = get_tokenizer()
    model = tiny_model(tok.get_vocab_size())
    good, bad = tok.encode("the answer is 4"), tok.encode("the answer is 5")
    prompt = tok.render_for_completion(RewardTask()[0])
    rows = [prompt + good, prompt + bad]
    width = max(map(len, rows)) - 1
    x = torch.zeros(2, width, dtype=torch.long)
    y = torch.full((2, width), -1, dtype=torch.long)
    for r, s in enumerate(rows):
        x[r, : len(s) - 1] = torch.tensor(s[:-1])
        y[r, len(prompt) - 1 : len(s) - 1] = torch.tensor(s[len(prompt):])

    def logprob(r):
        with torch.no_grad():
            return -model(x[r : r + 1], y[r : r + 1], loss_reduction="none").sum().item()

    before = logprob(0), logprob(1)
    optimizers = model.setup_optimizers()
    policy_gradient_loss(model, x, y, torch.tensor([1.0, -1.0]), int((y >= 0).sum())).backward()
    step_optimizers(optimizers)
    assert logprob(0) > before[0] and logprob(1) < before[1]


# ---- the stages end to end, from a tiny base model on the mirror's data ----

SMALL = ["--device_batch_size=4", "--max_seq_len=256", "--eval_every=2"]
STAGES = {
    "mid": ["scripts.mid_train", *SMALL, "--total_batch_size=2048", "--eval_tokens=2048",
            "--simple_spelling_size=50", "--spelling_bee_size=50"],
    "sft": ["scripts.chat_sft", *SMALL, "--examples_per_step=8", "--eval_conversations=8", "--eval_max_problems=8",
            "--exclude=ARC-Challenge"],  # the mirror holds ARC-Challenge's test split only
    "rl": ["scripts.chat_rl", "--device_batch_size=4", "--eval_every=2", "--examples_per_step=2", "--num_samples=4",
           "--max_new_tokens=12", "--eval_examples=4", "--eval_k=2"],
}


def logged_losses(stdout):
    return dict(re.findall(r"^step (\d+)/\d+ .*?\| loss: ([\d.]+)", stdout, re.M))


@pytest.fixture(scope="module")
def stages_env(pretrain_dir, shared_mirror, tmp_path_factory):
    """A copy of the pretraining dir with a tiny base model, fetching chat data from the mirror."""
    import shutil

    base = tmp_path_factory.mktemp("stages") / "base"
    shutil.copytree(pretrain_dir, base)
    env = {"NANOCHAT_BASE_DIR": str(base), "NANOCHAT_MIRROR": shared_mirror}
    r = run_module("scripts.base_train", "--depth=2", "--max_seq_len=256", "--device_batch_size=4", "--total_batch_size=1024",
                   "--num_iterations=4", "--eval_every=0", "--eval_tokens=1024", "--sample_every=0",
                   "--core_metric_every=-1", "--model_tag=d2", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return env


@pytest.mark.parametrize("stage", ["mid", "sft", "rl"])
def test_stage_trains_chats_evaluates_and_resumes(stages_env, stage):
    module, *flags = STAGES[stage]
    straight = run_module(module, *flags, "--num_iterations=4", "--save_every=2", env=stages_env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "saved checkpoint at step 4" in straight.stdout
    if stage == "mid":  # base training's schedule (RESULTS.md, "Midtraining's schedule")
        assert "warmdown_ratio=0.5," in straight.stdout and "momentum_cooldown=0.5," in straight.stdout
    losses = logged_losses(straight.stdout)
    assert len(losses) == 4

    resumed = run_module(module, *flags, "--num_iterations=4", "--resume=2", env=stages_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = logged_losses(resumed.stdout)
    assert again == {k: v for k, v in losses.items() if int(k) > 2}  # the same numbers after resuming

    chat = run_module("scripts.chat_cli", "-i", stage, "-p", "Hello!", "-m", "8", env=stages_env)
    assert chat.returncode == 0 and f"model: {stage}, step 4" in chat.stdout, chat.stderr[-2000:]
    evaluation = run_module("scripts.chat_eval", "-i", stage, "-x", "5", "-m", "8", "-a", "ARC-Easy|GSM8K", env=stages_env)
    assert evaluation.returncode == 0 and "ARC-Easy: " in evaluation.stdout, evaluation.stderr[-2000:]
