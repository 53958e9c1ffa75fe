"""The inference engine: exact against the cache-free reference, sampling, the calculator tool.

The GPT-based tests run on NANOCHAT_TEST_DEVICE (default cpu): dev/gpu_check.sh runs them on CUDA
too, where decoding goes through CUDA graphs."""

import os

import pytest
import torch

from nanochat.engine import Engine, KVCache, calculator
from nanochat.gpt import GPT, GPTConfig, config_for_depth
from nanochat.tokenizer import RustBPETokenizer

TEXT = "The quick brown fox jumps over the lazy dog. 12 * 7 = 84. " * 20
DEVICE = os.environ.get("NANOCHAT_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator(iter([TEXT]), 300)


@pytest.fixture(scope="module", params=[None, (4, 2, 0), (4, 2, 4 / 64)],
                ids=["1 head", "GQA 4/2", "GQA, 4-token window, scale 0.12, gates, smear, key offset, Canon, documents"])
def model(tok, request):
    torch.manual_seed(0)
    vocab = tok.get_vocab_size()
    with torch.device("meta"):
        if request.param is None:  # the depth dial's shape: one 128-dim head
            m = GPT(config_for_depth(2, vocab, 64))
        else:
            n_head, n_kv_head, window = request.param  # (a window on the first layer: shorter than most prompts)
            m = GPT(GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, n_embd=128,
                              window=window, attn_scale=0.12 if window else 0.0, attn_gate=bool(window), smear=bool(window),
                              key_offset=bool(window), canon=bool(window), doc_token=tok.get_bos_token_id() if window else -1))
    m.to_empty(device=DEVICE)
    m.init_weights()
    with torch.no_grad():
        m.lm_head.weight.normal_(std=0.5)  # a random init that is not near-uniform
        for block in m.transformer.h:  # and attention that matters
            block.attn.c_proj.weight.normal_(std=0.05)
            block.mlp.c_proj.weight.normal_(std=0.05)
            if block.attn.attn_gate is not None:
                block.attn.attn_gate.weight.normal_(std=0.1)
        if m.config.smear:  # each token's input part its predecessor's
            m.smear_lambda.fill_(0.5)
            m.smear_gate.weight.normal_(std=0.1)
        if m.config.canon:
            m.canon_weights.normal_(std=0.3)
    return m.eval()


def reference(model, tok, ids, max_tokens):
    """Greedy decoding without a cache, cut at the first stop token."""
    tokens = list(model.generate(ids, max_tokens, temperature=0))
    stops = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    return tokens[: next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]


@pytest.mark.parametrize("prompt", ["The quick", "12 * 7 =", "dog"])
def test_greedy_engine_equals_cache_free_generate(model, tok, prompt):
    ids = tok.encode(prompt, prepend="<|bos|>")
    rows, _ = Engine(model, tok).generate_batch(ids, num_samples=3, max_tokens=20, temperature=0)
    for row in rows:  # every row of the batch, decoded with the cache, matches
        assert row[len(ids):] == reference(model, tok, ids, 20)


@pytest.mark.parametrize("second", ["dog", "A"])  # "A": shorter than a Canon layer's reach back
def test_a_prompt_of_two_documents(model, tok, second):
    """A prompt with a second <|bos|>: the engine decodes what the cache-free reference does, and a
    model with documents answers as it does to the last document alone."""
    last = tok.encode(second, prepend="<|bos|>")
    ids = tok.encode("The quick brown fox", prepend="<|bos|>") + last
    rows, _ = Engine(model, tok).generate_batch(ids, num_samples=2, max_tokens=20, temperature=0)
    assert all(row[len(ids):] == reference(model, tok, ids, 20) for row in rows)
    alone = reference(model, tok, last, 20)
    assert (rows[0][len(ids):] == alone) == (model.config.doc_token >= 0)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU: dev/gpu_check.sh runs this file there")
def test_cuda_graphs_decode_as_the_eager_engine(model, tok):
    from nanochat.engine import _CudaGraphStep

    prompts = [tok.encode(t, prepend="<|bos|>") for t in ("The quick brown fox jumps over", "12", "lazy dog.")]
    graphed, eager = Engine(model, tok), Engine(model, tok, cuda_graphs=False)
    for _ in range(2):  # the second batch reuses the captured graph and its cache
        assert graphed.generate_many(prompts, 3, max_tokens=24, temperature=0) == \
            eager.generate_many(prompts, 3, max_tokens=24, temperature=0)
        assert isinstance(graphed._graphed[2], _CudaGraphStep)  # captured, not the eager fallback


def test_greedy_batch_of_mixed_prompts_equals_each_alone(model, tok):
    texts = ["The quick brown fox jumps over", "12", "lazy dog. 12 * 7 =", "The quick", "fox jumps over the lazy dog. The"]
    prompts = [tok.encode(t, prepend="<|bos|>") for t in texts]
    assert len(set(map(len, prompts))) == len(prompts)  # all lengths differ
    engine = Engine(model, tok)
    together = engine.generate_many(prompts, num_samples=2, max_tokens=24, temperature=0)
    for prompt, (sequences, masks) in zip(prompts, together):
        alone, alone_masks = engine.generate_batch(prompt, num_samples=1, max_tokens=24, temperature=0)
        assert sequences == alone * 2 and masks == alone_masks * 2
        assert sequences[0][len(prompt):] == reference(model, tok, prompt, 24)
        assert masks[0] == [0] * len(prompt) + [1] * (len(sequences[0]) - len(prompt))


def test_each_prompt_its_own_number_of_samples(model, tok):
    prompts = [tok.encode(t, prepend="<|bos|>") for t in ("The quick", "12 * 7 =", "dog")]
    engine = Engine(model, tok)
    results = engine.generate_many(prompts, num_samples=[1, 3, 2], max_tokens=10, temperature=0)
    assert [len(sequences) for sequences, _ in results] == [1, 3, 2]
    for prompt, (sequences, _) in zip(prompts, results):
        assert all(s[len(prompt):] == reference(model, tok, prompt, 10) for s in sequences)
    with pytest.raises(ValueError, match="num_samples must be at least 1 for each prompt"):
        engine.generate_many(prompts, num_samples=[1, 0, 2])


def test_sampling_rows_differ_and_seeds_reproduce(model, tok):
    engine = Engine(model, tok)
    prompts = [tok.encode(t, prepend="<|bos|>") for t in ("The", "The quick brown")]
    a = engine.generate_many(prompts, num_samples=4, max_tokens=12, temperature=1.0, seed=1)
    b = engine.generate_many(prompts, num_samples=4, max_tokens=12, temperature=1.0, seed=1)
    c = engine.generate_many(prompts, num_samples=4, max_tokens=12, temperature=1.0, seed=2)
    assert a == b and a != c
    assert all(len({tuple(r) for r in sequences}) > 1 for sequences, _ in a)  # rows sample independently, from the first token


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static (CUDA graph) layout"])
def test_rows_at_their_own_positions_match_the_full_forward(model, static):
    """Three prompts of different lengths, two rows each, prefilled once per prompt, then decoded a
    token per row per step (different tokens in every row): each step's logits are those of the
    row's whole sequence so far, computed without a cache."""
    c = model.config
    prompts = [torch.randint(0, c.vocab_size, (n,)).tolist() for n in (3, 9, 6)]
    cache = KVCache(3, 2, 12, 10, model, static=static)  # room for 12 prompt tokens, 10 reply tokens
    cache.start(prompts)
    seqs = [p for p in prompts for _ in range(2)]
    with torch.inference_mode():
        logits = torch.cat([cache.prefill(model, p, i).expand(2, -1) for i, p in enumerate(prompts)])
        for _ in range(8):
            for r, s in enumerate(seqs):
                assert torch.allclose(logits[r], model(torch.tensor([s], device=DEVICE), capped=False)[0, -1], atol=1e-4)
            new = torch.randint(0, c.vocab_size, (6,), device=DEVICE)
            logits = model(new[:, None], kv_cache=cache, capped=False)[:, -1]
            seqs = [s + [t] for s, t in zip(seqs, new.tolist())]
    assert cache.get_pos().tolist() == [len(s) for s in seqs]


def test_long_prompts_and_budgets_past_the_context(model, tok):
    engine = Engine(model, tok)
    context = model.config.sequence_len
    with pytest.raises(ValueError, match=f"a prompt of {context} tokens leaves no room in the model's {context}-token context"):
        engine.generate_many([[1] * 5, [1] * context], max_tokens=4)
    (sequences, _), = engine.generate_many([[1] * (context - 3)], num_samples=2, max_tokens=100, temperature=0)
    assert all(len(s) <= context for s in sequences)  # a clean stop at the context's end
    assert engine.generate_batch([1] * 5, max_tokens=0) == ([[1] * 5], [[0] * 5])
    with pytest.raises(ValueError, match="max_tokens must be >= 0"):
        engine.generate_batch([1] * 5, max_tokens=-1)


class ScriptedModel(torch.nn.Module):
    """Emits a fixed script of tokens, one per call, whatever it is fed."""

    def __init__(self, script, vocab_size):
        super().__init__()
        self.script, self.calls = script, 0
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.compute_dtype = torch.float32

    def forward(self, ids, kv_cache=None, last_only=False, capped=True):
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        logits = torch.full((ids.size(0), 1 if last_only else ids.size(1), self.config.vocab_size), -1e9)
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


class MarkovModel(torch.nn.Module):
    """Its next token is a fixed function of the last one it was fed (`follows`), so rows with
    different prompts take different paths through one batch."""

    def __init__(self, follows, vocab_size, filler):
        super().__init__()
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.next = torch.full((vocab_size,), filler)
        for a, b in follows.items():
            self.next[a] = b
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.compute_dtype = torch.float32

    def forward(self, ids, kv_cache=None, last_only=False, capped=True):
        ids = ids[:, -1:] if last_only else ids
        return torch.nn.functional.one_hot(self.next[ids], self.config.vocab_size).float() * 1e4


def test_tool_output_is_forced_per_row(tok):
    """One row calls the calculator while the others write text and stop at different steps."""
    s = tok.encode_special
    call = [s("<|python_start|>"), *tok.encode("6*7"), s("<|python_end|>")]
    words = tok.encode(" the quick brown fox")
    a, b, c = tok.encode("A")[0], tok.encode("B")[0], tok.encode("C")[0]
    assert len(set(call + words + [a, b, c])) == len(call + words) + 3  # each token leads one way
    follows = {a: call[0], **dict(zip(call, call[1:])), s("<|output_end|>"): s("<|assistant_end|>"),
               b: words[0], **dict(zip(words, words[1:])), words[-1]: s("<|assistant_end|>"), c: s("<|bos|>")}
    engine = Engine(MarkovModel(follows, tok.get_vocab_size(), filler=words[0]), tok)
    prompts = [[s("<|bos|>"), a], [s("<|bos|>"), s("<|user_start|>"), b], [c]]
    (calc, calc_masks), (text, text_masks), (empty, empty_masks) = engine.generate_many(prompts, num_samples=2, max_tokens=40, temperature=0)
    forced = [s("<|output_start|>"), *tok.encode("42"), s("<|output_end|>")]
    assert calc == [prompts[0] + call + forced] * 2
    assert calc_masks == [[0] * 2 + [1] * len(call) + [0] * len(forced)] * 2
    assert text == [prompts[1] + words] * 2 and text_masks == [[0] * 3 + [1] * len(words)] * 2
    assert empty == [[c]] * 2 and empty_masks == [[0]] * 2


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
