"""The inference engine: exact against the cache-free reference, sampling, the calculator tool."""

import pytest
import torch

from nanochat.engine import Engine, KVCache, calculator
from nanochat.gpt import GPT, GPTConfig, config_for_depth
from nanochat.tokenizer import RustBPETokenizer

TEXT = "The quick brown fox jumps over the lazy dog. 12 * 7 = 84. " * 20


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator(iter([TEXT]), 300)


@pytest.fixture(scope="module", params=[None, (4, 2)], ids=["1 head", "GQA 4/2"])
def model(tok, request):
    torch.manual_seed(0)
    vocab = tok.get_vocab_size()
    with torch.device("meta"):
        if request.param is None:  # the depth dial's shape: one 128-dim head
            m = GPT(config_for_depth(2, vocab, 64))
        else:
            n_head, n_kv_head = request.param
            m = GPT(GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, n_embd=128))
    m.to_empty(device="cpu")
    m.init_weights()
    with torch.no_grad():
        m.lm_head.weight.normal_(std=0.5)  # a random init that is not near-uniform
        for block in m.transformer.h:  # and attention that matters
            block.attn.c_proj.weight.normal_(std=0.05)
            block.mlp.c_proj.weight.normal_(std=0.05)
    return m.eval()


@pytest.mark.parametrize("prompt", ["The quick", "12 * 7 =", "dog"])
def test_greedy_engine_equals_cache_free_generate(model, tok, prompt):
    ids = tok.encode(prompt, prepend="<|bos|>")
    reference = list(model.generate(ids, 20, temperature=0))
    stops = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    cut = next((i for i, t in enumerate(reference) if t in stops), len(reference))
    rows, _ = Engine(model, tok).generate_batch(ids, num_samples=3, max_tokens=20, temperature=0)
    for row in rows:  # every row of the batch, decoded with the cache, matches
        assert row[len(ids):] == reference[:cut]


def test_sampling_rows_differ_and_seeds_reproduce(model, tok):
    engine = Engine(model, tok)
    ids = tok.encode("The", prepend="<|bos|>")
    a, _ = engine.generate_batch(ids, num_samples=4, max_tokens=12, temperature=1.0, seed=1)
    b, _ = engine.generate_batch(ids, num_samples=4, max_tokens=12, temperature=1.0, seed=1)
    c, _ = engine.generate_batch(ids, num_samples=4, max_tokens=12, temperature=1.0, seed=2)
    assert a == b and a != c
    assert len({tuple(r) for r in a}) > 1  # rows sample independently, the first token included


def test_kv_cache_grows_past_its_preallocation(model, tok):
    ids = tok.encode("The quick brown", prepend="<|bos|>")
    c = model.config
    cache = KVCache(1, c.n_kv_head, 2, c.n_embd // c.n_head, c.n_layer, "cpu")  # room for 2 positions only
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), kv_cache=cache)
        full = model(torch.tensor([ids]))
    assert cache.get_pos() == len(ids) and torch.allclose(logits, full, atol=1e-5)


class ScriptedModel(torch.nn.Module):
    """Emits a fixed script of tokens, one per call, whatever it is fed."""

    def __init__(self, script, vocab_size):
        super().__init__()
        self.script, self.calls = script, 0
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.compute_dtype = torch.float32

    def forward(self, ids, kv_cache=None):
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        logits = torch.full((ids.size(0), ids.size(1), self.config.vocab_size), -1e9)
        logits[:, :, token] = 0
        return logits


def test_tool_use_forces_the_calculator_output(tok):
    s = tok.encode_special
    expression = tok.encode("12*7")
    forced = [s("<|output_start|>"), *tok.encode("84"), s("<|output_end|>")]
    script = [s("<|python_start|>"), *expression, s("<|python_end|>")] + [0] * len(forced) + [s("<|assistant_end|>")]
    engine = Engine(ScriptedModel(script, tok.get_vocab_size()), tok)
    steps = list(engine.generate([tok.get_bos_token_id()], num_samples=2, max_tokens=50, temperature=0))
    tokens = [t[0] for t, _ in steps]
    masks = [m[0] for _, m in steps]
    expected = [s("<|python_start|>"), *expression, s("<|python_end|>"), *forced, s("<|assistant_end|>")]
    assert tokens == expected
    assert masks == [1] * (len(expression) + 2) + [0] * len(forced) + [1]
    assert all(t[0] == t[1] for t, _ in steps)  # both rows


@pytest.mark.parametrize("expression, expected", [
    ("12*7", 84), ("(3 + 4) * 2 - 1", 13), ("7 / 2", 3.5), ("2**10", 1024), ("-5 % 3", 1),
    ("'strawberry'.count('r')", 3), ("0.1 + 0.2", 0.3),
])
def test_calculator_arithmetic(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize("expression", [
    "__import__('os').system('echo pwned')", "open('/etc/passwd').read()", "().__class__.__bases__",
    "9**9**9", "2**10000000", "10**20 * 10**20", "'a' * 10**9", "[x for x in range(10**9)]",
    "lambda: 0", "x", "'abc'.upper()", "(1).__class__", "1/0", "1 +", "+".join(["1"] * 500),
    "'ab'.count(1)",
])
def test_calculator_refuses_hostile_input(expression):
    assert calculator(expression) is None


def test_bad_arguments(model, tok):
    engine = Engine(model, tok)
    for kwargs, message in [({"tokens": []}, "empty"), ({"tokens": [1], "num_samples": 0}, "num_samples"),
                            ({"tokens": [1], "temperature": -1}, "temperature"), ({"tokens": [1], "top_k": 0}, "top_k")]:
        with pytest.raises(ValueError, match=message):
            next(engine.generate(**kwargs))
