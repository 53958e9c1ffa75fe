"""
The GPT. Compared with GPT-2: rotary position embeddings instead of learned ones, QK-norm,
parameter-free RMSNorm, ReLU² MLP, no biases, untied embedding and unembedding, grouped-query
attention (n_kv_head <= n_head), logits soft-capped with tanh, output projections initialised
to zero so every block starts as the identity.

Weights are float32 (the optimizers' masters); activations, and so every matmul and the KV cache,
are in the compute dtype of `nanochat.common.compute_dtype` (bfloat16 on GPUs), which the model
applies itself: the embedding is cast to it, and each Linear casts its weight to its input's
dtype. Logits and losses are float32. No script needs an autocast context.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import compute_dtype
from nanochat.fp8 import Float8Linear


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10
    n_kv_head: int = 10
    n_embd: int = 1280
    # The recipe's options. These defaults are the original model, so that checkpoints saved before
    # an option existed load as they were trained; config_for_depth gives today's recipe.
    value_embeds: bool = False  # a second token embedding, gated, added to the values of every other layer
    residual_scalars: bool = False  # learned per-layer weights of the residual stream and of a skip from the input
    softcap: float = 15.0  # logits = softcap * tanh(logits / softcap)
    rotary_base: float = 10000.0
    window: float = 0.0  # attention window of three layers in four, as a fraction of sequence_len (0: the whole context)
    attn_scale: float = 0.0  # the attention scores' scale (0: 1/sqrt(head_dim))
    attn_gate: bool = False  # a learned gate per head on attention's output, read from the block's input
    smear: bool = False  # each token's embedding plus a learned, gated share of the previous token's
    key_offset: bool = False  # the full-context layers' keys take their slow rotary dims from the previous position
    tie_embedding: bool = False  # the lm_head's rows are the token embedding too (no separate table)
    canon: bool = False  # Canon layers: attention's and the MLP's inputs mix in the 3 positions before (a causal depthwise conv)
    doc_token: int = -1  # BOS, which begins a document: attention, smear, key offset and Canon stay inside one (-1: none)


RECIPE = dict(value_embeds=True, residual_scalars=False, softcap=15.0, rotary_base=10000.0, window=0.125, attn_scale=0.0,
              attn_gate=True, smear=True, key_offset=True, canon=False, tie_embedding=False)  # dev/bench/recipe.py


def config_for_depth(depth, vocab_size, sequence_len, head_dim=128, **overrides):
    """The one dial: width = 64 * depth, attention heads of (about) head_dim dims, and the RECIPE's
    options unless overridden."""
    n_embd = 64 * depth
    n_head = max(1, math.ceil(n_embd / head_dim))
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_kv_head=n_head,
                     n_embd=n_embd, **{**RECIPE, **overrides})


def has_value_embed(layer_idx, n_layer):
    """Value embeddings go to every other layer, counting back from the last."""
    return (n_layer - 1 - layer_idx) % 2 == 0


CANON_WIDTH = 4  # the positions a Canon layer mixes: the token's own and the 3 before it


def canon_conv(h, weight, before=None, starts=None):
    """A Canon layer (Allen-Zhu 2025, "Physics of Language Models: Part 4.1"): h (B, T, C) plus a
    causal depthwise convolution of h, weight (CANON_WIDTH, C), row i for the position i back; zero
    at init. `before` (B, CANON_WIDTH - 1, C) holds the inputs before h's first position (decoding;
    none of an earlier document), else there are none. With starts (B, T), the tokens that begin a
    document, no position mixes in one of an earlier document."""
    T, back = h.size(1), weight.size(0) - 1
    seq = torch.cat([h.new_zeros(h.size(0), back, h.size(2)) if before is None else before, h], dim=1)
    docs = None if starts is None else F.pad(starts.cumsum(1), (back, 0))  # `before` is the first position's document
    out = h
    for i in range(back + 1):
        term = seq[:, back - i : back - i + T]
        if docs is not None and i:
            term = term * (docs[:, back - i : back - i + T] == docs[:, back:]).unsqueeze(-1)
        out = out + weight[i] * term
    return out


def canon_tail(h, starts=None):
    """The inputs a Canon layer keeps for the next position: h's last CANON_WIDTH - 1 (zeros before
    its start and, with starts, before its last document begins); h (B, T, C), or already a tail
    followed by new positions."""
    back = CANON_WIDTH - 1
    tail = F.pad(h, (0, 0, back, 0))[:, -back:]
    if starts is not None:
        docs = F.pad(starts.cumsum(1), (back, 0))[:, -back:]
        tail = tail * (docs == docs[:, -1:]).unsqueeze(-1)
    return tail


def layer_window(layer_idx, config):
    """How many keys (itself included) a layer's query sees: config.window of the training context on
    three layers of every four, 0 (all) on the fourth and the last, through which the short layers'
    information travels. In tokens, fixed by the training length (generation past it keeps them)."""
    short = config.window > 0 and layer_idx % 4 != 3 and layer_idx != config.n_layer - 1
    return max(1, round(config.window * config.sequence_len)) if short else 0


class Linear(nn.Linear):
    """A bias-free linear layer that computes in its input's dtype from a float32 weight, or, with
    `fp8` set, whose training matmuls run in float8 (nanochat.fp8)."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)
        self.fp8 = False

    def forward(self, x):
        if self.fp8 and self.training and torch.is_grad_enabled():
            return Float8Linear.apply(x, self.weight)
        return F.linear(x, self.weight.to(x.dtype))


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def offset_keys(k, before=None, starts=None):
    """Each key's slow rotary dims (the pairs that turn least: [D/4, D/2) of each half) taken from
    the previous position's key, k (B, T, heads, D). A query can then find a position by the token
    before it and read that position's value: an induction head in one layer, where it takes two
    otherwise. The first position keeps its own, unless `before` (B, 1, heads, D) is the key of the
    token that came before (in decoding); so does a position where `starts` (B, T) says a document begins."""
    d = k.size(-1)
    prev = torch.cat([k[:, :1] if before is None else before, k[:, :-1]], dim=1)
    slow = torch.arange(d, device=k.device) % (d // 2) >= d // 4
    if starts is not None:
        slow = slow & ~starts[:, :, None, None]
    return torch.where(slow, prev, k)


def apply_rotary(x, cos, sin):
    """Rotate pairs (x1[i], x2[i]) of the two halves of each head by position-dependent angles:
    (x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin). The tables hold cos twice and (sin, -sin),
    so this is two multiplies and an add over the swapped halves."""
    d = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., d:], x[..., :d]], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    VE_GATE_CHANNELS = 32  # the value-embedding gate reads this many channels of the block's input

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx, self.window = layer_idx, layer_window(layer_idx, config)
        self.key_offset = config.key_offset and not self.window  # the layers that read far (after modded-nanogpt)
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        # attention computes q.k / sqrt(head_dim); another scale is folded into the (normed) queries
        self.q_gain = config.attn_scale * math.sqrt(self.head_dim) if config.attn_scale else None
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.ve_gate = None
        if config.value_embeds and has_value_embed(layer_idx, config.n_layer):
            self.ve_gate = Linear(min(self.VE_GATE_CHANNELS, config.n_embd), self.n_kv_head)
        # Gated attention (Qiu et al. 2025): each head's output times 2 * sigmoid(x @ w_head), 1 at
        # init; lets a head say nothing for a token instead of parking its attention on the first one.
        self.attn_gate = Linear(config.n_embd, self.n_head) if config.attn_gate else None

    def forward(self, x, cos, sin, kv_cache=None, ve=None, starts=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # a gate in (0, 2) per kv head, from the token's own input; 1 at init
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # QK-norm
        if self.key_offset:
            k = offset_keys(k, kv_cache.previous_key(self.layer_idx, k) if kv_cache is not None else None, starts)
        if self.q_gain is not None:
            q = q * self.q_gain
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        if kv_cache is None:
            y = causal_attention(q, k, v, self.window, None if starts is None else starts.cumsum(1))
        else:  # the cache stores k and v, and attends over everything it holds
            y = kv_cache.attend(self.layer_idx, q, k, v, starts)
        y = y.transpose(1, 2)  # (B, T, heads, head_dim)
        if self.attn_gate is not None:
            y = y * (2 * torch.sigmoid(self.attn_gate(x))).unsqueeze(-1)
        return self.c_proj(y.reshape(B, T, -1))


def causal_attention(q, k, v, window=0, docs=None):
    """q's Tq positions are the last of k's Tk; each attends to the keys at and before it, or with a
    window, to the last `window` of those; with `docs` (B, Tk), each key's document number, only
    to those of its own document. (B, heads, Tq, head_dim) over (B, kv_heads, Tk, head_dim)."""
    Tq, Tk = q.size(2), k.size(2)
    window = window if 0 < window < Tk else 0
    if Tq == Tk and not window and docs is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if q.device.type in FLEX_DEVICES and torch.compiler.is_compiling():  # a kernel that skips the masked blocks
        from torch.nn.attention.flex_attention import flex_attention
        return flex_attention(q, k, v, block_mask=attention_blocks(Tq, Tk, window, docs, q.device), enable_gqa=True)
    q_pos = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
    k_pos = torch.arange(Tk, device=q.device)
    mask = (k_pos <= q_pos) & (k_pos > q_pos - window) if window else k_pos <= q_pos
    if docs is not None:  # (B, 1, Tq, Tk)
        mask = mask & (docs[:, None, Tk - Tq :, None] == docs[:, None, None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


# Where sliding windows and document masks run through flex_attention when the model is compiled (its
# fused kernel exists only under torch.compile); elsewhere, and eagerly, SDPA takes a dense mask. Compile
# with dynamic=False, as the trainer does: torch 2.11's inductor fails to lower flex_attention at a
# symbolic sequence length (seen on an H200).
FLEX_DEVICES = {"cuda"}


def attention_blocks(Tq, Tk, window, docs, device):
    """flex_attention's block mask: query i (at position Tk - Tq + i) sees keys j <= position, with
    a window (0: none) those with j > position - window, with docs (B, Tk) those of its document."""
    from torch.nn.attention.flex_attention import create_block_mask
    offset = Tk - Tq

    def keep(b, h, q_idx, kv_idx):
        seen = kv_idx <= q_idx + offset
        if window:
            seen = seen & (kv_idx > q_idx + offset - window)
        if docs is not None:
            seen = seen & (docs[b, q_idx + offset] == docs[b, kv_idx])
        return seen

    return create_block_mask(keep, None if docs is None else docs.size(0), None, Tq, Tk, device=device)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)
        self.layer_idx = layer_idx

    def forward(self, x, cos, sin, kv_cache=None, ve=None, starts=None, canon=None):
        x = x + self.attn(self.canon(norm(x), canon, 0, kv_cache, starts), cos, sin, kv_cache, ve, starts)
        return x + self.mlp(self.canon(norm(x), canon, 1, kv_cache, starts))

    def canon(self, h, weights, which, kv_cache, starts):
        """The Canon layer on attention's input (which = 0) or the MLP's (1), if the model has them."""
        if weights is None:
            return h
        before = kv_cache.previous_inputs(self.layer_idx, which, h, starts) if kv_cache is not None else None
        return canon_conv(h, weights[which], before, starts)


class _ChunkedSoftcapCrossEntropy(torch.autograd.Function):
    """
    Mean cross-entropy of soft-capped logits h @ W.T, computed in chunks of rows, with the
    gradients worked out in the same pass. The (tokens x vocab) logits never exist whole: each
    chunk's stay in cache, which saves the ~10 passes over them that the plain path makes.
    A float32 CPU training optimisation; the plain path in GPT.forward is the reference it is tested
    against (and what GPUs and low-precision runs use; torch.compile fuses the same work there).
    """

    @staticmethod
    def forward(ctx, h, W, targets, vocab_size, softcap, chunk=256):
        ctx.padded_rows = W.size(0)
        W = W[:vocab_size]
        count = (targets >= 0).sum().clamp(min=1)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h, grad_W = torch.empty_like(h), torch.zeros_like(W)
        for start in range(0, h.size(0), chunk):
            hc, tc = h[start : start + chunk], targets[start : start + chunk]
            valid = (tc >= 0).unsqueeze(1)
            tc = tc.clamp(min=0).unsqueeze(1)
            t = torch.tanh((hc @ W.T).mul_(1 / softcap))
            logits = t * softcap
            lse = torch.logsumexp(logits, dim=1, keepdim=True)
            loss += ((lse - logits.gather(1, tc)) * valid).sum()
            # d loss / d z = (softmax - onehot) * (1 - tanh^2), for valid rows, over the count
            grad = logits.sub_(lse).exp_()
            grad.scatter_add_(1, tc, torch.full_like(tc, -1, dtype=grad.dtype))
            grad.mul_(t.square_().neg_().add_(1)).mul_(valid / count)
            grad_h[start : start + chunk] = grad @ W
            grad_W.addmm_(grad.T, hc)
        ctx.save_for_backward(grad_h, grad_W)
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_W = ctx.saved_tensors
        return grad_h * grad_loss, _pad_rows(grad_W * grad_loss, ctx.padded_rows), None, None, None, None


def _pad_rows(grad, total_rows):
    """The gradient of the padded vocab rows is zero."""
    return torch.cat([grad, grad.new_zeros(total_rows - grad.size(0), grad.size(1))]) if total_rows > grad.size(0) else grad


class GPT(nn.Module):
    SMEAR_CHANNELS = 32  # the smear gate reads this many channels of the token's own embedding

    def __init__(self, config):
        super().__init__()
        self.config = config
        # Pad the vocab to a multiple of 64 for efficient matmuls; the extra logits are cropped.
        self.padded_vocab = -(-config.vocab_size // 64) * 64
        token = {} if config.tie_embedding else {"wte": nn.Embedding(self.padded_vocab, config.n_embd)}
        self.transformer = nn.ModuleDict({**token, "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)])})
        self.lm_head = Linear(config.n_embd, self.padded_vocab)
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(self.padded_vocab, kv_dim) for i in range(config.n_layer)
                                           if config.value_embeds and has_value_embed(i, config.n_layer)})
        if config.smear:  # x_t += lambda * sigmoid(w . x_t[:32]) * x_(t-1): a bigram feature for one lookup
            self.smear_gate = Linear(min(self.SMEAR_CHANNELS, config.n_embd), 1)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.residual_scalars:  # block i reads resid_lambdas[i] * x + x0_lambdas[i] * x0 (x0: the embedding)
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.canon:  # (layer, attention's or the MLP's, position back, channel); AdamW at scalar_lr
            self.canon_weights = nn.Parameter(torch.zeros(config.n_layer, 2, CANON_WIDTH, config.n_embd))
        # Rotary tables for 10x the training length, so generation can run past it.
        self.rotary_len = config.sequence_len * 10
        cos, sin = self._rotary_tables(self.rotary_len)
        self.compute_dtype = compute_dtype(cos.device)  # (init_weights settles it for the real device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, length, device=None):
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / self.config.rotary_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
        cos, sin = angles.cos(), angles.sin()
        return torch.cat([cos, cos], -1)[None, :, None, :], torch.cat([sin, -sin], -1)[None, :, None, :]  # (1, T, 1, head_dim)

    @torch.no_grad()
    def init_weights(self, scale=1.0):
        """Fill every parameter (the model may have been built on the meta device) and settle, now
        that the device is known, the rotary tables and the compute dtype. `scale` multiplies the
        standard deviation of the blocks' input matrices and value tables (1/sqrt(fan_in) at 1)."""
        if not self.config.tie_embedding:  # (its rows are normed where they are read: the scale is the LR's)
            nn.init.normal_(self.transformer.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        bound = scale * math.sqrt(3.0 / self.config.n_embd)  # uniform with variance scale^2/fan_in
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            for gate in (block.attn.ve_gate, block.attn.attn_gate):
                if gate is not None:
                    nn.init.zeros_(gate.weight)  # gate 2 * sigmoid(0) = 1
        for table in self.value_embeds.values():  # like c_v's output, which they add to
            nn.init.uniform_(table.weight, -bound, bound)
        if self.config.smear:  # lambda 0: no smear at the start, the gate learns through lambda's gradient first
            nn.init.zeros_(self.smear_gate.weight)
            self.smear_lambda.zero_()
        if self.config.residual_scalars:
            self.resid_lambdas.fill_(1.0)
            self.x0_lambdas.fill_(0.1)
        if self.config.canon:  # zero: every Canon layer starts as the identity
            self.canon_weights.zero_()
        self.cos, self.sin = self._rotary_tables(self.rotary_len, device=self.lm_head.weight.device)
        self.compute_dtype = compute_dtype(self.lm_head.weight.device)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def use_fp8(self):
        """Train the blocks' large matmuls in float8 (the lm_head and the small gates stay as they are)."""
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                linear.fp8 = True

    def embeddings(self):
        """The lookup tables: the token embedding (unless the lm_head's rows are it) and any value embeddings."""
        token = [] if self.config.tie_embedding else [self.transformer.wte.weight]
        return token + [table.weight for table in self.value_embeds.values()]

    def scalars(self):
        """The small parameters outside the blocks, trained by AdamW at scalar_lr."""
        return (([self.resid_lambdas, self.x0_lambdas] if self.config.residual_scalars else [])
                + ([self.smear_lambda, self.smear_gate.weight] if self.config.smear else [])
                + ([self.canon_weights] if self.config.canon else []))

    def matrices(self):
        """The blocks' parameters, all matrices, trained by Muon."""
        return list(self.transformer.h.parameters())

    def estimate_flops(self):
        """FLOPs per token of a training step: 6 per matmul weight (forward + backward) plus the
        attention score and value matmuls over the keys a layer sees (its window, if shorter than the
        context). Lookups and per-layer scalars cost nothing worth counting."""
        c = self.config
        head_dim = c.n_embd // c.n_head
        matmul_params = self.num_params() - sum(p.numel() for p in self.embeddings() + self.scalars())
        keys = sum(min(layer_window(i, c) or c.sequence_len, c.sequence_len) for i in range(c.n_layer))
        return 6 * matmul_params + 12 * c.n_head * head_dim * keys

    def set_window(self, fraction):
        """Give the short layers a window of `fraction` of the training context for now (base_train's
        window schedule); the model saved and served keeps config.window, so training ends on it."""
        config = replace(self.config, window=fraction)
        for block in self.transformer.h:
            if block.attn.window:
                block.attn.window = layer_window(block.attn.layer_idx, config)

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, scalar_lr=0.02,
                         matrix_weight_decay=0.0, newton_schulz="classic", normuon_beta2=0.0, equilibrate_rows=False):
        """AdamW for the embeddings and unembedding (learning rates scaled by 1/sqrt(width/768)) and
        the per-layer scalars, Muon for every matrix in the blocks (see optim.Muon for its options).
        Both shard their work when torch.distributed is up."""
        from nanochat.optim import AdamW, Muon

        scale = (self.config.n_embd / 768) ** -0.5
        groups = [{"params": [self.lm_head.weight], "lr": unembedding_lr * scale},
                  {"params": self.embeddings(), "lr": embedding_lr * scale}]
        if self.scalars():
            groups.append({"params": self.scalars(), "lr": scalar_lr, "weight_decay": 0.0})
        adamw = AdamW(groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
        muon = Muon(self.matrices(), lr=matrix_lr, momentum=0.95, newton_schulz=newton_schulz,
                    equilibrate_rows=equilibrate_rows, normuon_beta2=normuon_beta2, weight_decay=matrix_weight_decay)
        for opt in (adamw, muon):
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return [adamw, muon]

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False, capped=True):
        """Logits (float32, soft-capped) of every position, or of the last only; with targets, the
        loss. capped=False leaves out the soft cap, which keeps the logits' order: a sampler can cap
        just the top k it keeps (see `sample`). A kv_cache has get_pos(), the position of idx's first
        token (an int shared by all rows, or a tensor of one position per row when each row brings
        one token); attend(layer, q, k, v, starts), which stores the new keys and values and returns
        the attention of the new queries over everything it holds (starts (B, T): the new tokens
        that begin a document, for a model with a doc_token, else None; no query may see an earlier
        document); for a smear model, previous_tokens(idx): the token before each row's first new
        one (None at the sequence's start); for a key-offset model, previous_key(layer, k):
        likewise the layer's key (before its offset) of that token; and for a Canon model,
        previous_inputs(layer, which, h, starts): the Canon layer's inputs of the CANON_WIDTH - 1
        tokens before (zeros for those of an earlier document; None at the start)."""
        T = idx.size(1)
        pos = kv_cache.get_pos() if kv_cache is not None else 0
        dtype = self.compute_dtype
        if torch.is_tensor(pos):
            cos, sin = self.cos[0, pos, None], self.sin[0, pos, None]  # (rows, 1, 1, head_dim)
        elif pos + T > self.rotary_len:
            raise ValueError(f"sequence of {pos + T} tokens is longer than the rotary tables ({self.rotary_len})")
        else:
            cos, sin = self.cos[:, pos : pos + T], self.sin[:, pos : pos + T]
        cos, sin = cos.to(dtype), sin.to(dtype)
        starts = idx == self.config.doc_token if self.config.doc_token >= 0 else None  # the tokens that begin a document
        x = x0 = self.embed(idx)
        if self.config.smear:
            x = x0 = self.smear(x, idx, kv_cache, starts)
        for i, block in enumerate(self.transformer.h):
            if self.config.residual_scalars:
                x = self.resid_lambdas[i].to(dtype) * x + self.x0_lambdas[i].to(dtype) * x0
            ve = self.value_embeds[str(i)](idx).to(dtype) if str(i) in self.value_embeds else None
            canon = self.canon_weights[i].to(dtype) if self.config.canon else None
            x = block(x, cos, sin, kv_cache, ve, starts, canon)
        x = norm(x[:, -1:] if last_only else x)
        if (targets is not None and loss_reduction == "mean" and torch.is_grad_enabled() and x.device.type == "cpu"
                and dtype == torch.float32):
            return _ChunkedSoftcapCrossEntropy.apply(
                x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1), self.config.vocab_size, self.config.softcap)
        logits = self.lm_head(x)[..., : self.config.vocab_size].float()
        if not capped:
            if targets is not None:
                raise ValueError("capped=False gives logits for sampling; a loss needs the capped ones")
            return logits
        logits = softcap(logits, self.config.softcap)
        if targets is None:
            return logits
        logits, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
        if loss_reduction == "mean":  # a batch with no targets has loss 0, not NaN
            return F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum") / (targets >= 0).sum().clamp(min=1)
        return F.cross_entropy(logits, targets, ignore_index=-1, reduction=loss_reduction)

    def embed(self, idx):
        """The normed token embeddings, in the compute dtype."""
        table = self.lm_head.weight if self.config.tie_embedding else self.transformer.wte.weight
        return norm(F.embedding(idx, table).to(self.compute_dtype))

    def smear(self, x, idx, kv_cache, starts=None):
        """Add to each token's (normed) embedding a gated share of the previous token's. The first
        token has none, unless a KV cache says which token came before idx (in decoding), and
        neither has a token that begins a document (`starts`)."""
        before = kv_cache.previous_tokens(idx) if kv_cache is not None else None
        if before is None:
            prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        else:
            prev = torch.cat([self.embed(before[:, None]), x[:, :-1]], dim=1)
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., : self.smear_gate.in_features]))
        if starts is not None:
            gate = gate * ~starts[..., None]
        return x + gate * prev

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive sampling without a KV cache (the reference the inference engine must match):
        yields one token id at a time. temperature 0 is greedy."""
        device = self.lm_head.weight.device
        rng = torch.Generator(device=device).manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            next_id = sample(self.forward(ids)[:, -1, :], rng, temperature, top_k)
            ids = torch.cat([ids, next_id[:, None]], dim=1)
            yield next_id.item()


def softcap(logits, cap):
    """cap * tanh(logits / cap): bounded, smooth, order-preserving."""
    return torch.tanh(logits * (1 / cap)) * cap


def sample(logits, rng, temperature, top_k=None, cap=None):
    """One token per row of (rows, vocab) logits: argmax at temperature 0, else a draw from
    softmax(logits / temperature), among the top k if given. With `cap`, the logits come uncapped
    and the soft cap is applied here, after the top-k cut (it keeps their order), to k per row
    instead of the whole vocabulary. The draw inverts the distribution's CDF at one uniform
    number per row (torch.multinomial draws one per vocabulary entry)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    ids = None
    if top_k is not None and top_k < logits.size(-1):
        logits, ids = torch.topk(logits, top_k, dim=-1, sorted=False)  # (the CDF needs no order)
    if cap is not None:
        logits = softcap(logits, cap)
    cdf = F.softmax(logits.float() / temperature, dim=-1).cumsum(dim=-1)
    u = torch.rand(logits.size(0), 1, generator=rng, device=logits.device) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u, right=True).clamp_(max=logits.size(-1) - 1)  # first entry whose CDF passes u
    return (choice if ids is None else ids.gather(-1, choice))[:, 0]
