"""The GPU code path, on CPU: with NANOCHAT_DTYPE=bfloat16 every stage computes as it does on a CUDA
machine (bfloat16 activations, matmuls and KV cache over float32 weights), only slowly. The model is
checked against the same weights in float32; every stage is run for real."""

import json
import math
import re
import shutil

import pytest
import requests
import torch

from conftest import run_module, serve_chat
from nanochat.common import DTYPES, compute_dtype
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig, Linear
from nanochat.tokenizer import get_tokenizer
from test_chat_train import STAGES

BF16 = {"NANOCHAT_DTYPE": "bfloat16"}


def test_the_dtype_policy(monkeypatch):
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    assert compute_dtype("cpu") == torch.float32  # (bfloat16 on a CUDA GPU that has it)
    for name in DTYPES:
        monkeypatch.setenv("NANOCHAT_DTYPE", name)
        assert compute_dtype("cpu") == getattr(torch, name)
    monkeypatch.setenv("NANOCHAT_DTYPE", "bf16")
    with pytest.raises(SystemExit, match="NANOCHAT_DTYPE='bf16'; expected one of bfloat16, float16, float32"):
        compute_dtype("cpu")


def gqa_model(vocab, monkeypatch, dtype, doc_token, seed=0):
    """A 2-layer model with 4 query heads on 2 key/value heads, the recipe's parts (a 16-token
    window on the first layer, value embeddings on the last, attention gates, smear, the key
    offset, Canon layers, documents that begin at doc_token) and live output projections, gates
    and lambdas, identical weights for a given seed whatever its compute dtype."""
    monkeypatch.setenv("NANOCHAT_DTYPE", dtype)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, n_embd=128,
                          value_embeds=True, window=0.25, attn_gate=True, smear=True, key_offset=True, canon=True,
                          doc_token=doc_token))
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.1)
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.05)
            block.mlp.c_proj.weight.normal_(std=0.05)
            for gate in (block.attn.ve_gate, block.attn.attn_gate):
                if gate is not None:
                    gate.weight.normal_(std=0.1)
        model.smear_gate.weight.normal_(std=0.1)
        model.smear_lambda.fill_(0.5)
        model.canon_weights.normal_(std=0.3)
    return model


def test_bf16_forward_and_backward_track_float32(monkeypatch):
    reference, model = gqa_model(512, monkeypatch, "float32", 0), gqa_model(512, monkeypatch, "bfloat16", 0)
    assert model.compute_dtype == torch.bfloat16
    seen = set()
    for module in model.modules():
        if isinstance(module, Linear):
            module.register_forward_hook(lambda mod, args, out: seen.add((args[0].dtype, out.dtype)))
    x, y = torch.randint(1, 512, (3, 40)), torch.randint(0, 512, (3, 40))
    x[:, [0, 13, 31]] = 0  # three documents a row
    loss, ref_loss = model(x, y), reference(x, y)
    assert seen == {(torch.bfloat16, torch.bfloat16)}  # every matmul ran in bf16
    assert loss.dtype == torch.float32 and abs(loss.item() - ref_loss.item()) < 0.01
    loss.backward()
    ref_loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.dtype == p.grad.dtype == torch.float32, name  # float32 masters and gradients for the optimizers
        assert torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0) > 0.999, name
    with torch.no_grad():
        logits, ref_logits = model(x), reference(x)
    assert logits.dtype == torch.float32 and (logits - ref_logits).abs().max() < 0.15  # of logits up to ~5


def test_bf16_engine_decodes_batches_with_a_bf16_cache(chat_env, monkeypatch):
    tok = get_tokenizer()
    model = gqa_model(tok.get_vocab_size(), monkeypatch, "bfloat16", tok.get_bos_token_id()).eval()
    engine = Engine(model, tok)
    cache, _ = engine._decoder(1, 3, 8, 4)
    assert cache.prompt_k.dtype == cache.reply_k.dtype == torch.bfloat16
    prompt = tok.encode("The quick brown fox", prepend="<|bos|>")
    rows, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=16, temperature=0)
    assert rows[0] == rows[1] == rows[2] and len(rows[0]) > len(prompt)
    with torch.no_grad():  # each greedy token is the argmax of the full (cache-free) bf16 forward, up to bf16 noise
        logits = model(torch.tensor([rows[0]]))[0]
    for pos in range(len(prompt), len(rows[0])):
        assert logits[pos - 1, rows[0][pos]] >= logits[pos - 1].max() - 0.1
    sampled, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=16, temperature=1.0, seed=3)
    assert len({tuple(r) for r in sampled}) > 1


# ---- every stage as a user runs it, in bf16 ----

def step_losses(stdout):
    return [float(v) for v in re.findall(r"^step \d+/\d+ .*?\| loss: ([\d.]+)", stdout, re.M)]


def ran_in_bf16(result):
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compute dtype bfloat16" in result.stderr


@pytest.fixture(scope="module")
def bf16_env(pretrain_dir, shared_mirror, tmp_path_factory):
    """A base model trained one step in bf16, and an SFT model made from it in one step (in bf16)."""
    base = tmp_path_factory.mktemp("bf16") / "base"
    shutil.copytree(pretrain_dir, base)
    env = {"NANOCHAT_BASE_DIR": str(base), "NANOCHAT_MIRROR": shared_mirror, **BF16}
    train = run_module("scripts.base_train", "--depth=2", "--max_seq_len=256", "--device_batch_size=4",
                       "--total_batch_size=1024", "--num_iterations=1", "--eval_every=0", "--eval_tokens=1024",
                       "--sample_every=0", "--core_metric_every=-1", "--model_tag=d2", env=env)
    ran_in_bf16(train)
    [loss] = step_losses(train.stdout)
    assert abs(loss - math.log(512)) < 0.5  # a fresh model's loss: ~log(vocab), and finite
    assert math.isfinite(float(re.search(r"val bpb: ([\d.]+)", train.stdout)[1]))
    assert "sample: The capital of France is" in train.stdout  # greedy samples at the end, in bf16
    module, *flags = STAGES["sft"]
    sft = run_module(module, *flags, "-i", "base", "--num_iterations=1", env=env)
    ran_in_bf16(sft)
    assert all(math.isfinite(v) for v in step_losses(sft.stdout)) and "mmlu_acc" in sft.stdout
    return env


@pytest.mark.parametrize("stage, source", [("mid", "base"), ("rl", "sft")])
def test_bf16_training_stage_takes_a_step(bf16_env, stage, source):
    module, *flags = STAGES[stage]
    r = run_module(module, *flags, "-i", source, "--num_iterations=1", "--dry_run=1", env=bf16_env)
    ran_in_bf16(r)
    [loss] = step_losses(r.stdout)
    assert math.isfinite(loss)


def test_bf16_chat_cli_answers(bf16_env):
    r = run_module("scripts.chat_cli", "-p", "Hello", "-m", "8", "--device_type=cpu", env=bf16_env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "model: sft, step 1 (bfloat16 on cpu)" in r.stdout and "Assistant: " in r.stdout


def test_bf16_chat_eval_categorical_and_generative(bf16_env):
    r = run_module("scripts.chat_eval", "-i", "sft", "-x", "3", "-m", "8", "-a", "MMLU|GSM8K", env=bf16_env)
    ran_in_bf16(r)
    assert re.search(r"^MMLU: \d/3", r.stdout, re.M) and re.search(r"^GSM8K: \d/3", r.stdout, re.M)


def test_bf16_base_eval_scores_core_items(bf16_env):
    r = run_module("scripts.base_eval", "--max_per_task=2", env=bf16_env)
    ran_in_bf16(r)
    assert math.isfinite(float(re.search(r"^CORE\s+(-?[\d.]+)", r.stdout, re.M)[1]))


def test_bf16_chat_web_streams_a_reply(bf16_env, tmp_path):
    with serve_chat(bf16_env["NANOCHAT_BASE_DIR"], tmp_path / "server.log", env=bf16_env) as url:
        assert "bfloat16" in requests.get(url + "/health", timeout=10).json()["model"]
        body = {"messages": [{"role": "user", "content": "Hello!"}], "temperature": 0, "max_tokens": 8}
        r = requests.post(url + "/chat/completions", json=body, stream=True, timeout=120)
        stream = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert r.status_code == 200 and stream[-1] == {"done": True}
    assert len(stream) > 1 and all("token" in e for e in stream[:-1])


def test_float16_training_is_refused_in_one_line(bf16_env):
    r = run_module("scripts.base_train", "--depth=2", "--max_seq_len=256", "--device_batch_size=4",
                   "--total_batch_size=1024", "--num_iterations=1", "--model_tag=f16",
                   env={**bf16_env, "NANOCHAT_DTYPE": "float16"})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: NANOCHAT_DTYPE=float16 can evaluate and chat but not train")
