"""The GPT against closed forms, a second code path (KV cache) and a tiny overfitting run."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import (GPT, GPTConfig, apply_rotary, attention_blocks, canon_conv, canon_tail, causal_attention,
                          config_for_depth, layer_window, norm)
from nanochat.optim import step_optimizers


def make(depth, vocab=1000, seq=64, seed=0, **options):
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config_for_depth(depth, vocab, seq, **options))
    model.to_empty(device="cpu")
    model.init_weights()
    return model


PLAIN = dict(value_embeds=False, residual_scalars=False, window=0.0, attn_gate=False, smear=False, key_offset=False, canon=False)
RICH = dict(value_embeds=True, residual_scalars=True, window=0.25, attn_gate=True, smear=True, key_offset=True, canon=True)


@pytest.mark.parametrize("options", [PLAIN, RICH, {**RICH, "tie_embedding": True}], ids=["plain", "every option", "tied"])
@pytest.mark.parametrize("depth", [1, 2, 4, 6])
@pytest.mark.parametrize("head_dim", [128, 64])
def test_parameter_count_and_flops_closed_form(depth, options, head_dim):
    vocab, seq = 1000, 64
    model = make(depth, vocab, seq, head_dim=head_dim, **options)
    C, padded = 64 * depth, 1024  # 1000 padded up to a multiple of 64
    n_ve = (depth + 1) // 2 if options["value_embeds"] else 0  # every other layer, the last included
    gates = n_ve * min(32, C) * model.config.n_head  # each reads 32 channels, one gate per kv head
    gates += depth * C * model.config.n_head if options.get("attn_gate") else 0  # attention's: all channels, one per head
    scalars = 2 * depth if options["residual_scalars"] else 0
    scalars += min(32, C) + 1 if options.get("smear") else 0  # the smear's gate (32 channels) and its lambda
    scalars += depth * 2 * 4 * C if options.get("canon") else 0  # two Canon layers a block, 4 positions x C channels
    tables = 1 if options.get("tie_embedding") else 2  # the embedding and the lm_head, or one matrix for both
    assert model.num_params() == 12 * depth * C * C + tables * padded * C + n_ve * padded * C + gates + scalars
    short = sum(1 for i in range(depth - 1) if i % 4 != 3) if options["window"] else 0  # windowed layers: 3 in 4, not the last
    keys = short * seq // 4 + (depth - short) * seq  # the keys each layer's attention reads
    assert model.estimate_flops() == 6 * (12 * depth * C * C + padded * C + gates) + 12 * C * keys
    assert C // model.config.n_head == min(C, head_dim)


@pytest.mark.parametrize("options", [PLAIN, RICH, {**RICH, "tie_embedding": True}], ids=["plain", "every option", "tied"])
def test_the_optimizers_take_every_parameter_once(options):
    """Muon the blocks' matrices, AdamW everything else."""
    model = make(2, **options)
    adamw, muon = model.setup_optimizers()
    taken = [p for opt in (adamw, muon) for group in opt.param_groups for p in group["params"]]
    assert sorted(map(id, taken)) == sorted(map(id, model.parameters()))
    assert all(p.ndim == 2 for group in muon.param_groups for p in group["params"])


def test_depth_20_is_the_speedrun_model():
    with torch.device("meta"):
        model = GPT(config_for_depth(20, 65536, 2048))
    assert model.config.n_embd == 1280 and model.config.n_head == 10
    tables = sum(t.weight.numel() for t in model.value_embeds.values())
    assert round((model.num_params() - tables) / 1e6) == 561  # and 10 value embeddings of 65536 x 1280
    assert tables == 10 * 65536 * 1280


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_init_scale_sets_the_input_matrices_std(scale):
    """Uniform init: std = scale / sqrt(width) for the blocks' input matrices and value tables;
    the output projections start at zero whatever the scale."""
    torch.manual_seed(0)
    model = GPT(config_for_depth(4, 1000, 64, value_embeds=True))
    model.init_weights(scale)
    width = model.config.n_embd
    inputs = [b.attn.c_q.weight for b in model.transformer.h] + [b.mlp.c_fc.weight for b in model.transformer.h]
    inputs += [t.weight for t in model.value_embeds.values()]
    for w in inputs:
        assert abs(w.std().item() * math.sqrt(width) / scale - 1) < 0.03
        assert w.abs().max().item() <= scale * math.sqrt(3 / width)
    assert all(not b.mlp.c_proj.weight.any() for b in model.transformer.h)


def test_loss_at_init_is_log_vocab():
    model = make(2, vocab=1000)
    x = torch.randint(0, 1000, (4, 64))
    assert abs(model(x, x).item() - math.log(1000)) < 0.05


def test_logits_are_cropped_and_ignored_targets_do_not_count():
    model = make(2, vocab=1000)
    x = torch.randint(0, 1000, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 1000)
    y = x.clone()
    y[:, ::2] = -1
    per_token = model(x, y, loss_reduction="none").view(2, 16)
    assert torch.all(per_token[:, ::2] == 0)
    assert torch.allclose(model(x, y), per_token[:, 1::2].mean())


class TinyKVCache:
    """The KV-cache protocol the model expects: get_pos(); attend(layer, q, k, v, starts), which
    keeps k and v and attends over all of them (or a windowed layer's last ones; of the query's
    document, if starts marks where documents begin); previous_tokens(idx), the token before idx's
    first (None at the start); previous_key(layer, k), likewise its key."""

    def __init__(self, config):
        n_layer = config.n_layer
        self.k, self.v, self.pos, self.n_layer = [None] * n_layer, [None] * n_layer, 0, n_layer
        self.windows = [layer_window(i, config) for i in range(n_layer)]
        self.last, self.last_k, self.starts, self.last_h = None, [None] * n_layer, None, {}

    def get_pos(self):
        return self.pos

    def previous_tokens(self, idx):
        before, self.last = self.last, idx[:, -1]
        return before

    def previous_key(self, layer, k):
        before, self.last_k[layer] = self.last_k[layer], k[:, -1:]
        return before

    def previous_inputs(self, layer, which, h, starts=None):
        before = self.last_h.get((layer, which))
        seq = h if before is None else torch.cat([before, h], dim=1)
        seq_starts = None if starts is None else F.pad(starts, (seq.size(1) - h.size(1), 0))
        self.last_h[layer, which] = canon_tail(seq, seq_starts)
        return before

    def attend(self, layer, q, k, v, starts=None):
        self.k[layer] = k if self.k[layer] is None else torch.cat([self.k[layer], k], dim=2)
        self.v[layer] = v if self.v[layer] is None else torch.cat([self.v[layer], v], dim=2)
        if starts is not None and layer == 0:
            self.starts = starts if self.starts is None else torch.cat([self.starts, starts], dim=1)
        if layer == self.n_layer - 1:
            self.pos += k.size(2)
        docs = None if starts is None else self.starts.cumsum(1)
        return causal_attention(q, self.k[layer], self.v[layer], self.windows[layer], docs)


# Heads of 128 dims (the depth dial's), and narrower heads: 4 query heads sharing 2 or 1 key/value heads.
SHAPES = {"1 head": None, "4 heads": (4, 4), "GQA 4/2": (4, 2), "MQA 4/1": (4, 1)}


def make_live(shape, vocab=1000, seq=64, seed=0, options=RICH):
    """A 2-layer model whose output projections are not zero, so attention changes the output."""
    if shape is None:
        model = make(2, vocab, seq, seed, **options)
    else:
        torch.manual_seed(seed)
        model = GPT(GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=2, n_head=shape[0], n_kv_head=shape[1],
                              n_embd=128, **options))
        model.init_weights()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.05)
            block.mlp.c_proj.weight.normal_(std=0.05)
            if block.attn.attn_gate is not None:
                block.attn.attn_gate.weight.normal_()  # gates that are not 1 everywhere
        if model.config.smear:
            model.smear_lambda.fill_(0.5)
            model.smear_gate.weight.normal_()
        if model.config.canon:
            model.canon_weights.normal_(std=0.3)
    return model.eval()


def naive_attention(attn, x, cos, sin, window=0, scale=None, key_offset=False):
    """Causal self-attention written head by head: query head h reads key/value head
    h // (n_head / n_kv_head); scores, softmax and the weighted sum spelled out. With a window,
    query i reads keys i - window + 1 .. i. Scores are scaled by 1/sqrt(head_dim) unless `scale` says otherwise.
    With an attention gate, head h's output is scaled by 2 * sigmoid(x . w_h). With a key offset,
    key i's dims of rotary pairs j >= head_dim / 4 (the slowest half) are key i - 1's (i > 0)."""
    B, T, C = x.shape
    hd, group = attn.head_dim, attn.n_head // attn.n_kv_head
    q = attn.c_q(x).view(B, T, attn.n_head, hd)
    k = attn.c_k(x).view(B, T, attn.n_kv_head, hd)
    v = attn.c_v(x).view(B, T, attn.n_kv_head, hd)
    q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
    if key_offset:
        shifted = k.clone()
        for pair in range(hd // 4, hd // 2):  # pair j rotates dims j and j + hd/2, at the j-th highest frequency
            for dim in (pair, pair + hd // 2):
                shifted[:, 1:, :, dim] = k[:, :-1, :, dim]
        k = shifted
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    if window:
        causal &= torch.ones(T, T, dtype=torch.bool).triu(diagonal=1 - window)
    heads = []
    for h in range(attn.n_head):
        qh, kh, vh = q[:, :, h], k[:, :, h // group], v[:, :, h // group]  # (B, T, hd)
        scores = (qh @ kh.transpose(1, 2) * (scale or hd**-0.5)).masked_fill(~causal, float("-inf"))
        out = scores.softmax(-1) @ vh
        if attn.attn_gate is not None:
            out = out * 2 * torch.sigmoid(x @ attn.attn_gate.weight[h])[..., None]
        heads.append(out)
    return attn.c_proj(torch.cat(heads, dim=-1))


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_attention_matches_a_head_by_head_reference(shape):
    model = make_live(shape)
    x = torch.randn(3, 10, 128)
    cos, sin = model.cos[:, :10], model.sin[:, :10]
    with torch.no_grad():
        for attn in (block.attn for block in model.transformer.h):  # a windowed layer, then a full one with the key offset
            reference = naive_attention(attn, x, cos, sin, attn.window, key_offset=attn.key_offset)
            assert torch.allclose(attn(x, cos, sin), reference, atol=1e-5)


def test_key_offset_is_on_the_full_context_layers_and_changes_them():
    model = make_live(None)
    assert [block.attn.key_offset for block in model.transformer.h] == [False, True]  # layer 0 is windowed
    assert all(block.attn.key_offset for block in make_live(None, options={**RICH, "window": 0.0}).transformer.h)
    attn, x = model.transformer.h[1].attn, torch.randn(3, 10, 128)
    cos, sin = model.cos[:, :10], model.sin[:, :10]
    with torch.no_grad():
        assert not torch.allclose(attn(x, cos, sin), naive_attention(attn, x, cos, sin), atol=1e-3)


def test_sliding_window_attention_matches_the_reference():
    """The windowed layers (three in four, the last one full) against the head-by-head reference."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=1000, n_layer=6, n_head=4, n_kv_head=2, n_embd=128, window=3 / 64))
    model.init_weights()
    assert [block.attn.window for block in model.transformer.h] == [3, 3, 3, 0, 3, 0]
    x = torch.randn(2, 10, 128)
    cos, sin = model.cos[:, :10], model.sin[:, :10]
    with torch.no_grad():
        for layer in (0, 3):
            attn = model.transformer.h[layer].attn
            attn.c_proj.weight.normal_(std=0.05)
            assert torch.allclose(attn(x, cos, sin), naive_attention(attn, x, cos, sin, attn.window), atol=1e-5)
        attn = model.transformer.h[0].attn
        assert not torch.allclose(attn(x, cos, sin), naive_attention(attn, x, cos, sin), atol=1e-3)  # the window matters


def window_twins(config, fraction):
    """A model with random block weights, and the same weights in a model built with another window."""
    torch.manual_seed(0)
    model, short = GPT(config), GPT(GPTConfig(**{**vars(config), "window": fraction}))
    model.init_weights()
    for p in model.transformer.h.parameters():
        p.data.normal_(std=0.05)
    short.load_state_dict(model.state_dict())
    return model, short


def test_set_window_computes_the_model_built_with_that_window():
    """base_train's window schedule: set_window(f) on a model is the model configured with window f,
    on the short layers only, and set_window(config.window) gives it back."""
    config = GPTConfig(sequence_len=64, vocab_size=1000, n_layer=6, n_head=4, n_kv_head=2, n_embd=128, window=0.25, key_offset=True)
    model, short = window_twins(config, 3 / 64)
    idx = torch.randint(0, 1000, (2, 40))
    with torch.no_grad():
        full = model(idx)
        model.set_window(3 / 64)
        assert [b.attn.window for b in model.transformer.h] == [b.attn.window for b in short.transformer.h] == [3, 3, 3, 0, 3, 0]
        assert torch.equal(model(idx), short(idx)) and not torch.allclose(model(idx), full, atol=1e-3)
        model.set_window(config.window)
        assert [b.attn.window for b in model.transformer.h] == [16, 16, 16, 0, 16, 0] and torch.equal(model(idx), full)


def test_compiled_model_follows_set_window(monkeypatch):
    """On GPUs the trainer compiles the model and the window schedule calls set_window on it between
    steps: the compiled model must recompile (its flex block mask holds the window as a constant),
    not go on with the window it was first traced at. (Dynamo's guards decide that, so the cheap
    aot_eager backend stands in for inductor here.)"""
    import nanochat.gpt

    blocks = []
    monkeypatch.setattr(nanochat.gpt, "FLEX_DEVICES", {"cpu"})
    monkeypatch.setattr(nanochat.gpt, "attention_blocks", lambda *a: blocks.append(a[2]) or attention_blocks(*a))
    config = GPTConfig(sequence_len=256, vocab_size=1000, n_layer=2, n_head=4, n_kv_head=2, n_embd=128, window=0.25)
    model, short = window_twins(config, 1 / 16)
    compiled, idx = torch.compile(model, dynamic=False, backend="aot_eager"), torch.randint(0, 1000, (2, 256))
    with torch.no_grad():
        final = model(idx)
        model.set_window(1 / 16)
        assert torch.allclose(compiled(idx), short(idx), atol=1e-4)
        model.set_window(config.window)
        assert torch.allclose(compiled(idx), final, atol=1e-4) and not torch.allclose(final, short(idx), atol=1e-3)
    assert set(blocks) == {16, 64}  # one trace per window, each through flex


def test_attention_scale_scales_the_scores():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=1000, n_layer=2, n_head=4, n_kv_head=2, n_embd=128, attn_scale=0.3))
    model.init_weights()
    attn = model.transformer.h[0].attn
    x, cos, sin = torch.randn(2, 10, 128), model.cos[:, :10], model.sin[:, :10]
    with torch.no_grad():
        attn.c_proj.weight.normal_(std=0.05)
        assert torch.allclose(attn(x, cos, sin), naive_attention(attn, x, cos, sin, scale=0.3), atol=1e-5)
        assert not torch.allclose(attn(x, cos, sin), naive_attention(attn, x, cos, sin), atol=1e-3)


@pytest.mark.parametrize("window, documents", [(200, False), (200, True), (0, True)])
def test_compiled_masks_run_flex_attention_on_the_kept_blocks(monkeypatch, window, documents):
    """Under torch.compile (as training runs on GPUs) a window or documents go through flex_attention's
    block mask; it computes what the dense mask does (forward only: flex has no CPU backward)."""
    import nanochat.gpt

    blocks = []
    monkeypatch.setattr(nanochat.gpt, "FLEX_DEVICES", {"cpu"})
    monkeypatch.setattr(nanochat.gpt, "attention_blocks", lambda *a: blocks.append(a) or attention_blocks(*a))
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 300, 32), torch.randn(2, 2, 300, 32), torch.randn(2, 2, 300, 32)
    docs = (torch.rand(2, 300) < 0.01).cumsum(1) if documents else None  # documents of ~100 tokens
    with torch.no_grad():
        flex = torch.compile(causal_attention, fullgraph=True, dynamic=False)(q, k, v, window, docs)
    assert len(blocks) == 1
    assert torch.allclose(flex, causal_attention(q, k, v, window, docs), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention has no CPU backward: dev/gpu_check.sh runs this on CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window, documents", [(256, False), (256, True), (0, True)])
def test_flex_attention_backward_matches_the_dense_mask_on_cuda(dtype, window, documents):
    """Training's path on GPUs: the compiled flex kernel's gradients equal the eager dense mask's."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, 1024, 64, device="cuda", dtype=dtype, requires_grad=True) for h in (4, 2, 2))
    grad = torch.randn(2, 4, 1024, 64, device="cuda", dtype=dtype)
    docs = (torch.rand(2, 1024, device="cuda") < 0.003).cumsum(1) if documents else None  # documents of ~300 tokens
    results = []
    for attend in (torch.compile(causal_attention, fullgraph=True, dynamic=False), causal_attention):
        out = attend(q, k, v, window, docs)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    tol = 2e-3 if dtype == torch.float32 else 5e-2  # (flex may run float32 in TF32)
    for flex, dense in zip(*results):
        assert (flex.float() - dense.float()).abs().max() < tol * dense.float().abs().max()


def test_sliding_window_flops_count_the_keys_each_layer_sees():
    model = make(6, seq=64, **{**PLAIN, "window": 0.25})  # 16 tokens
    C = 64 * 6
    assert model.estimate_flops() == 6 * (12 * 6 * C * C + 1024 * C) + 12 * C * (4 * 16 + 2 * 64)  # 4 short layers, 2 full


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_kv_cache_matches_full_forward(shape):
    model = make_live(shape)
    x = torch.randint(0, 1000, (3, 20))  # three different rows
    full = model(x)
    cache = TinyKVCache(model.config)
    pieces = [model(x[:, :12], kv_cache=cache)]  # prefill, then a chunk, then one token at a time
    pieces.append(model(x[:, 12:15], kv_cache=cache))
    pieces += [model(x[:, t : t + 1], kv_cache=cache) for t in range(15, 20)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


DOC = 999  # the document token of the tests' models


def test_documents_do_not_see_each_other():
    """With a doc_token, a document's logits are what it gets alone: attention (windowed and full),
    smear, the key offset and Canon layers do not reach across the token that begins it. Without
    one, they do."""
    torch.manual_seed(0)
    first, second = torch.randint(0, DOC, (2, 23)), torch.randint(0, DOC, (2, 30))
    first[:, 0] = second[:, 0] = DOC
    for doc_token in (DOC, -1):
        model = make_live((4, 2), options={**RICH, "doc_token": doc_token})  # layer 0: a 16-token window
        with torch.no_grad():
            together = model(torch.cat([first, second], dim=1))
            assert torch.allclose(together[:, :23], model(first), atol=1e-5)
            assert torch.allclose(together[:, 23:], model(second), atol=1e-4) == (doc_token == DOC)


def test_kv_cache_matches_full_forward_across_documents():
    model = make_live((4, 2), options={**RICH, "doc_token": DOC})
    x = torch.randint(0, DOC, (3, 20))
    x[:, 0] = DOC
    x[0, 5], x[1, 13], x[2, 17] = DOC, DOC, DOC  # a document begins in the prefill, the chunk, the one-token steps
    full = model(x)
    cache = TinyKVCache(model.config)
    pieces = [model(x[:, :12], kv_cache=cache), model(x[:, 12:15], kv_cache=cache)]
    pieces += [model(x[:, t : t + 1], kv_cache=cache) for t in range(15, 20)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_value_embedding_is_added_to_the_values_through_its_gate():
    """A layer's value embedding against a second path: the plain attention whose c_v output gets
    2 * sigmoid(gate(x[:32])) * ve added by a hook."""
    model = make_live(None, options=RICH)
    attn = model.transformer.h[1].attn
    with torch.no_grad():
        attn.ve_gate.weight.normal_()  # a gate that is not 1 everywhere
    x, ve = torch.randn(3, 10, 128), torch.randn(3, 10, 128)
    cos, sin = model.cos[:, :10], model.sin[:, :10]
    with torch.no_grad():
        ours = attn(x, cos, sin, ve=ve)
        gate = 2 * torch.sigmoid(x[..., :32] @ attn.ve_gate.weight.T)  # (3, 10, heads = kv heads = 1)
        hook = attn.c_v.register_forward_hook(lambda module, inputs, out: out + gate.repeat_interleave(128, -1) * ve)
        attn.ve_gate, saved = None, attn.ve_gate
        reference = attn(x, cos, sin)
        hook.remove()
        attn.ve_gate = saved
    assert torch.allclose(ours, reference, atol=1e-5) and not torch.allclose(ours, attn(x, cos, sin, ve=None), atol=1e-3)
    assert set(model.value_embeds) == {"1"} and model.transformer.h[0].attn.ve_gate is None  # 2 layers: the last has one


def test_residual_scalars_against_a_hand_written_forward():
    model = make_live(None, options=dict(value_embeds=False, residual_scalars=True, smear=False))
    with torch.no_grad():
        model.resid_lambdas.copy_(torch.tensor([0.7, 1.3]))
        model.x0_lambdas.copy_(torch.tensor([0.2, -0.4]))
        idx = torch.randint(0, 1000, (2, 12))
        cos, sin = model.cos[:, :12], model.sin[:, :12]
        x0 = norm(model.transformer.wte(idx))
        x = x0
        for i, block in enumerate(model.transformer.h):
            x = block(model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0, cos, sin)
        reference = 15 * torch.tanh(model.lm_head(norm(x)) / 15)
        assert torch.allclose(model(idx), reference[..., :1000], atol=1e-5)


def test_tied_embedding_is_the_lm_head_and_both_uses_train_it():
    """A tied model computes what an untied one does whose embedding is a copy of its lm_head, and
    its one matrix's gradient is the sum of the two matrices' gradients there."""
    untied = make_live(None)
    tied = make_live(None, options={**RICH, "tie_embedding": True})
    assert "transformer.wte.weight" not in dict(tied.named_parameters())
    assert tied.load_state_dict(untied.state_dict(), strict=False).unexpected_keys == ["transformer.wte.weight"]
    with torch.no_grad():
        untied.transformer.wte.weight.copy_(untied.lm_head.weight)
    x, y = torch.randint(0, 1000, (2, 16)), torch.randint(0, 1000, (2, 16))
    loss, untied_loss = tied(x, y), untied(x, y)
    assert torch.allclose(loss, untied_loss)
    loss.backward()
    untied_loss.backward()
    both = untied.transformer.wte.weight.grad + untied.lm_head.weight.grad
    assert untied.transformer.wte.weight.grad.abs().sum() > 0 and torch.allclose(tied.lm_head.weight.grad, both, atol=1e-6)


def test_smear_against_a_hand_written_embedding():
    """Token t's input is e_t + lambda * sigmoid(w . e_t[:32]) * e_(t-1) (e: the normed embedding);
    the first token's is its own embedding."""
    model = make_live(None, options=dict(value_embeds=False, smear=True))
    idx = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        e = norm(model.transformer.wte(idx))
        x = e.clone()
        for t in range(1, 12):
            x[:, t] += 0.5 * torch.sigmoid(e[:, t, :32] @ model.smear_gate.weight[0]).unsqueeze(-1) * e[:, t - 1]
        cos, sin = model.cos[:, :12], model.sin[:, :12]
        for block in model.transformer.h:
            x = block(x, cos, sin)
        reference = 15 * torch.tanh(model.lm_head(norm(x)) / 15)
        assert torch.allclose(model(idx), reference[..., :1000], atol=1e-5)
        assert not torch.allclose(model(idx), make_live(None, options=dict(value_embeds=False, smear=False))(idx), atol=1e-3)


def test_canon_layer_against_a_hand_written_convolution():
    """Position t's output is h_t + sum over i = 0..3 of w_i * h_(t-i), where positions before the
    sequence come from `before` (decoding) or are absent, and none is of an earlier document; the
    tail kept for the next position is the last 3 inputs of the current document."""
    torch.manual_seed(0)
    B, T, C = 2, 9, 8
    h, w, before = torch.randn(B, T, C), torch.randn(4, C), torch.randn(B, 3, C)
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[0, 4] = starts[0, 7] = starts[1, 0] = True  # row 1's first token begins a document: `before` is another
    for prev, doc_starts in [(None, None), (before, None), (before, starts)]:
        seq = h if prev is None else torch.cat([prev, h], dim=1)
        offset = seq.size(1) - T
        reference = h.clone()
        for b in range(B):
            for t in range(T):
                for i in range(4):
                    crosses = doc_starts is not None and bool(doc_starts[b, max(t - i + 1, 0) : t + 1].any())
                    if offset + t - i >= 0 and not crosses:
                        reference[b, t] += w[i] * seq[b, offset + t - i]
        assert torch.allclose(canon_conv(h, w, prev, doc_starts), reference, atol=1e-6)
    tail = canon_tail(h, starts)
    assert torch.equal(tail[0, 0], torch.zeros(C)) and torch.equal(tail[0, 1:], h[0, 7:])  # position 6 is the document before
    assert torch.equal(tail[1], h[1, 6:]) and torch.equal(canon_tail(h[:, :2])[:, 0], torch.zeros(B, C))


def test_neutral_options_compute_the_plain_model():
    """Value embeddings of zero, residual weights of 1, input-skip and Canon weights of 0 change
    nothing: the options add to the model, they do not disturb what was there."""
    plain, rich = make_live(None, options=PLAIN), make_live(None, options={**RICH, "window": 0.0, "key_offset": False})
    missing = rich.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["canon_weights", "resid_lambdas", "smear_gate.weight", "smear_lambda", "transformer.h.0.attn.attn_gate.weight",
                               "transformer.h.1.attn.attn_gate.weight", "transformer.h.1.attn.ve_gate.weight",
                               "value_embeds.1.weight", "x0_lambdas"]
    with torch.no_grad():
        rich.value_embeds["1"].weight.zero_()
        rich.x0_lambdas.zero_()
        rich.smear_lambda.zero_()
        rich.canon_weights.zero_()
        for block in rich.transformer.h:
            block.attn.attn_gate.weight.zero_()  # gates of 1
    idx = torch.randint(0, 1000, (2, 16))
    assert torch.allclose(rich(idx), plain(idx), atol=1e-6)


def test_greedy_generate_is_argmax_of_forward():
    model = make(2).eval()
    prompt = [5, 17, 42]
    out = list(model.generate(prompt, 6, temperature=0))
    ids = list(prompt)
    for _ in range(6):
        ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    assert out == ids[3:]
    sampled = [list(model.generate(prompt, 6, temperature=1.0, top_k=50, seed=s)) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_one_batch_overfits():
    model = make(2, vocab=256, seq=32)
    optimizers = model.setup_optimizers()
    x = torch.randint(0, 256, (4, 33))
    for _ in range(150):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        step_optimizers(optimizers, grad_clip=1.0)
        model.zero_grad(set_to_none=True)
    assert loss.item() < 0.1


def test_chunked_training_loss_matches_the_plain_path():
    """Training on CPU takes the chunked loss; evaluation (no grad) takes the plain path."""
    model = make(2, vocab=1000)  # padded to 1024: the padding rows get zero gradient
    x = torch.randint(0, 1000, (3, 64))
    y = torch.randint(0, 1000, (3, 64))
    y[0, :10] = -1
    with torch.no_grad():
        plain = model(x, y)
    model.lm_head.weight.data.normal_(std=0.5)  # larger logits exercise the soft cap

    grads = []
    for fused in (True, False):
        model.zero_grad()
        if fused:
            loss = model(x, y)
        else:  # the plain path: logits, soft cap, cross-entropy
            per_token = model(x, y, loss_reduction="none")
            loss = per_token.sum() / (y >= 0).sum()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_f, g_f), (loss_p, g_p) = grads
    assert torch.allclose(loss_f, loss_p, atol=1e-5)
    for name in g_p:
        assert torch.allclose(g_f[name], g_p[name], atol=1e-6, rtol=1e-4), name
    assert torch.all(g_f["lm_head.weight"][1000:] == 0)
    assert abs(plain.item() - math.log(1000)) < 0.05


def test_a_batch_without_targets_has_zero_loss_not_nan():
    model = make(2, vocab=100)
    x = torch.randint(0, 100, (2, 8))
    y = torch.full((2, 8), -1)
    with torch.no_grad():
        assert model(x, y).item() == 0.0  # the plain path (what GPUs use)
    loss = model(x, y)  # the chunked training path on CPU
    loss.backward()
    assert loss.item() == 0.0 and all(p.grad is None or not p.grad.isnan().any() for p in model.parameters())
