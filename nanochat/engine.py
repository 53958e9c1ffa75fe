"""
Inference: many prompts generated at once, each with its own number of samples, over a KV cache
allocated once; and the python calculator tool.

    engine = Engine(model, tokenizer)
    [(sequences, masks), ...] = engine.generate_many([prompt_a, prompt_b], num_samples=4, max_tokens=64)
    # per prompt, its samples: prompt + reply tokens (the stop token left out); mask 0 on the prompt
    # and on tool output the engine forced in, 1 on what the model sampled
    for tokens, masks in engine.generate(prompt, num_samples=1, max_tokens=64):   # one prompt, streamed
        ...

How a batch runs. Every sample is a row. Each distinct prompt is run through the model once
(logits computed for its last position only), its keys and values written straight into its rows
of a cache of final size (layers, rows, kv heads, longest prompt + max_tokens, head dim). Then all
rows decode together, one token each per step, each at its own position: row r's new key goes to
slot pos[r] and its query attends to slots 0..pos[r] (one key mask per step, shared by every layer;
slots not yet written hold zeros, so masking them is exact; a layer with a sliding window also
masks the slots before its window). A row stops on its own, at
<|assistant_end|> or <|bos|> or its budget (max_tokens, capped by the model's context); its later
tokens are ignored, and the batch ends when every row has stopped. Greedy decoding gives a prompt
the tokens it gets alone (exactly on CPU in float32; on a GPU, matmuls of other batch shapes may
round differently and flip a near-tie). One Engine runs one batch at a time.

Each step stays on the device: sampling, forcing tool output into a row, stop detection and
recording. The host reads two flags per step (did a row just close a python call? has every row
stopped?) and a row's tokens only when it must run the calculator for it. On CUDA the decode step
(the forward of one token per row) is captured once as a CUDA graph and replayed, which removes
the per-kernel launch cost that dominates small batches; elsewhere, or if capture fails, it runs
eagerly.
"""

import ast
import logging
import operator
import threading
import time

import torch

from nanochat.gpt import CANON_WIDTH, canon_tail, causal_attention, layer_window, sample

logger = logging.getLogger(__name__)
MAX_FORCED_TOKENS = 64  # room for one tool output in a row (a longer result is refused)


class KVCache:
    """The keys and values of a batch whose rows come in groups of `group` samples of one prompt:
    each prompt's once, (layers, prompts, kv heads, longest prompt, head dim), and each row's reply
    tokens', (layers, rows, kv heads, budget, head dim). Every row is at the same step t of its
    reply, at position len(its prompt) + t. A static cache (for CUDA graphs) keeps every shape
    fixed and masks the reply slots not yet written; otherwise attention reads only those written."""

    def __init__(self, prompts, group, prompt_len, budget, model, static=False):
        c = model.config
        device, dtype = next(model.parameters()).device, model.compute_dtype
        rows, head_dim = prompts * group, c.n_embd // c.n_head
        self.group, self.static = group, static
        self.prompt_k = torch.zeros(c.n_layer, prompts, c.n_kv_head, prompt_len, head_dim, device=device, dtype=dtype)
        self.prompt_v = torch.zeros_like(self.prompt_k)
        self.reply_k = torch.zeros(c.n_layer, rows, c.n_kv_head, budget, head_dim, device=device, dtype=dtype)
        self.reply_v = torch.zeros_like(self.reply_k)
        self.prompt_mask = torch.zeros(rows, 1, 1, prompt_len, dtype=torch.bool, device=device)  # its prompt's slots
        self.pos = torch.zeros(rows, dtype=torch.long, device=device)
        self.last = torch.zeros(rows, dtype=torch.long, device=device)  # each row's latest token (a smear model reads it)
        self.last_k = torch.zeros(c.n_layer, rows, 1, c.n_kv_head, head_dim, device=device, dtype=dtype)  # and its keys (key offset)
        canon_shape = (c.n_layer, 2, rows, CANON_WIDTH - 1, c.n_embd)  # and its Canon layers' last inputs
        self.last_h = torch.zeros(canon_shape, device=device, dtype=dtype) if c.canon else None
        self.t = torch.zeros(1, dtype=torch.long, device=device)  # the step, on the device (graph replays advance it)
        self.steps = 0  # the same, on the host (eager calls advance it)
        self.slots = torch.arange(budget, device=device)
        self.prompt_slots = torch.arange(prompt_len, device=device)
        self.windows = [layer_window(i, c) for i in range(c.n_layer)]  # keys each layer's query sees (0: all)
        self.doc_token = c.doc_token

    def start(self, prompts):
        """A new batch of prompts (in place: a CUDA graph holds these tensors). A row's query sees its
        prompt's slots from where the prompt's last document begins (for a model with a doc_token)."""
        first = [max((i for i, t in enumerate(p) if t == self.doc_token), default=0) for p in prompts]
        lengths, first = (torch.tensor(a, device=self.pos.device).repeat_interleave(self.group) for a in ([len(p) for p in prompts], first))
        slots = torch.arange(self.prompt_mask.size(-1), device=lengths.device)
        self.prompt_mask.copy_(((slots < lengths[:, None]) & (slots >= first[:, None]))[:, None, None])
        self.pos.copy_(lengths)
        self.t.zero_()
        self.steps = 0
        self.prompt_v.zero_()  # masked slots get weight 0: their values must be finite, not an old batch's NaN
        self.reply_v.zero_()

    def prefill(self, model, prompt, index):
        """Run prompt number `index` through the model once, keeping its keys and values; returns
        the logits of its last position before the soft cap, (1, vocab)."""
        ids = torch.tensor([prompt], dtype=torch.long, device=self.pos.device)
        return model(ids, kv_cache=_PromptView(self, index), last_only=True, capped=False)[:, -1]

    def get_pos(self):
        return self.pos

    def previous_tokens(self, idx):
        """The token before each row's new one; the new one becomes the latest."""
        before = self.last.clone()
        self.last.copy_(idx[:, -1])
        return before

    def previous_key(self, layer, k):
        """The layer's key of the token before each row's new one; the new one's becomes the latest."""
        before = self.last_k[layer].clone()
        self.last_k[layer].copy_(k)
        return before

    def previous_inputs(self, layer, which, h, starts=None):
        """A Canon layer's inputs of the tokens before each row's new one; the new one's joins them."""
        before = self.last_h[layer, which].clone()
        self.last_h[layer, which].copy_(torch.cat([before[:, 1:], h], dim=1))
        return before

    def attend(self, layer, q, k, v, starts=None):
        """One new token per row: keep its key and value, attend over its prompt's and its reply's.
        (`starts` is not needed: a row stops at <|bos|>, so no reply begins a document.)"""
        self.reply_k[layer].index_copy_(2, self.t, k)
        self.reply_v[layer].index_copy_(2, self.t, v)
        reply_k, reply_v, reply_mask, prompt_mask = self.reply_k[layer], self.reply_v[layer], None, self.prompt_mask
        slots = self.slots
        if self.static:
            reply_mask = slots <= self.t
        else:
            reply_k, reply_v, slots = reply_k[:, :, : self.steps + 1], reply_v[:, :, : self.steps + 1], slots[: self.steps + 1]
        window = self.windows[layer]
        if window:  # the query is at position pos = len(prompt) + t: prompt slot j is in if j > pos - window, reply slot s if s > t - window
            prompt_mask = prompt_mask & (self.prompt_slots > (self.pos - window)[:, None, None, None])
            in_window = slots > self.t - window
            reply_mask = in_window if reply_mask is None else reply_mask & in_window
        y = _prompt_and_reply_attention(q, self.prompt_k[layer], self.prompt_v[layer], prompt_mask,
                                        reply_k, reply_v, reply_mask)
        if layer == self.reply_k.size(0) - 1:
            self.pos += 1
            self.t += 1
            self.steps += 1
        return y


class _PromptView:
    """The cache as the model sees it while prefilling one prompt."""

    def __init__(self, cache, index):
        self.cache, self.index = cache, index

    def get_pos(self):
        return 0

    def previous_tokens(self, idx):
        """None: a prompt starts the sequence. Its last token is its rows' latest."""
        group = self.cache.group
        self.cache.last[self.index * group : (self.index + 1) * group] = idx[0, -1]
        return None

    def previous_key(self, layer, k):
        """Likewise for a layer's keys."""
        group = self.cache.group
        self.cache.last_k[layer, self.index * group : (self.index + 1) * group] = k[0, -1]
        return None

    def previous_inputs(self, layer, which, h, starts=None):
        """Likewise for a Canon layer's inputs (those of the prompt's last document)."""
        group = self.cache.group
        self.cache.last_h[layer, which, self.index * group : (self.index + 1) * group] = canon_tail(h, starts)[0]
        return None

    def attend(self, layer, q, k, v, starts=None):
        n = k.size(2)
        self.cache.prompt_k[layer, self.index, :, :n] = k[0]
        self.cache.prompt_v[layer, self.index, :, :n] = v[0]
        return causal_attention(q, k, v, self.cache.windows[layer], None if starts is None else starts.cumsum(1))


def _prompt_and_reply_attention(q, prompt_k, prompt_v, prompt_mask, reply_k, reply_v, reply_mask):
    """Attention of one query per row, q (rows, heads, 1, head_dim), over its prompt's keys (shared
    by the `group` rows of a prompt: one matmul per prompt serves them all, instead of a copy per
    row) and its own reply's, with one softmax over both. Two masks: prompt_mask (rows, 1, 1,
    prompt slots), reply_mask (reply slots,) or None. Plain batched matmuls: SDPA's fused kernels
    are made for many queries, and are several times slower than this for one, on CPU. (In bf16
    the scores are rounded to bf16 before the float32 softmax, where SDPA's GPU kernels keep them
    in float32: a small loss of precision, not measured to matter yet.)"""
    rows, heads, _, dim = q.shape  # (keys as the left operand of the score matmuls: faster on CPU)
    prompts, kv_heads, prompt_len, _ = prompt_k.shape
    group, per_kv = rows // prompts, heads // kv_heads
    # (rows, heads) -> (prompts, kv_heads, group * per_kv): every query that reads a prompt's keys
    by_prompt = q.reshape(prompts, group, kv_heads, per_kv, dim).transpose(1, 2).reshape(prompts, kv_heads, -1, dim)
    prompt_scores = (prompt_k @ by_prompt.mT).mT.reshape(prompts, kv_heads, group, per_kv, prompt_len)
    prompt_scores = prompt_scores.transpose(1, 2).reshape(rows, kv_heads, per_kv, prompt_len)
    reply_scores = (reply_k @ q.reshape(rows, kv_heads, per_kv, dim).mT).mT
    prompt_scores = prompt_scores.float().masked_fill(~prompt_mask, float("-inf"))
    reply_scores = reply_scores.float()
    if reply_mask is not None:
        reply_scores = reply_scores.masked_fill(~reply_mask, float("-inf"))
    weights = (torch.cat([prompt_scores, reply_scores], dim=-1) * dim**-0.5).softmax(dim=-1).to(q.dtype)
    prompt_w, reply_w = weights.split([prompt_len, reply_scores.size(-1)], dim=-1)
    prompt_w = prompt_w.reshape(prompts, group, kv_heads, per_kv, prompt_len).transpose(1, 2)
    y = (prompt_w.reshape(prompts, kv_heads, -1, prompt_len) @ prompt_v).view(prompts, kv_heads, group, per_kv, dim)
    y = y.transpose(1, 2).reshape(rows, kv_heads, per_kv, dim) + reply_w @ reply_v
    return y.reshape(rows, heads, 1, dim)


# ---- the calculator tool ----

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 10**30  # keeps every intermediate result small, so no operation can run long


def calculator(expression, time_limit=0.1):
    """Evaluate arithmetic on numbers, or 'text'.count('t'), and nothing else: no names, no
    builtins, no attributes but .count on a string literal, bounded magnitudes and time.
    Returns the result, or None if the expression is refused."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        deadline = time.monotonic() + time_limit
        result = _evaluate(tree.body, deadline)
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError, _Refused):
        return None
    if isinstance(result, float):
        result = round(result, 10)
    return result


class _Refused(Exception):
    pass


def _evaluate(node, deadline):
    if time.monotonic() > deadline:
        raise _Refused("too slow")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_number(_evaluate(node.operand, deadline))))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _number(_evaluate(node.left, deadline)), _number(_evaluate(node.right, deadline))
        if isinstance(node.op, ast.Pow) and (abs(right) > 100 or abs(left) > 10**6):
            raise _Refused("power too large")
        return _checked(_BINARY[type(node.op)](left, right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
            and len(node.args) == 1 and not node.keywords):
        needle = _evaluate(node.args[0], deadline)
        if not isinstance(needle, str):
            raise _Refused("count takes a string")
        return node.func.value.value.count(needle)
    raise _Refused(f"{type(node).__name__} is not allowed")


def _number(value):
    if type(value) not in (int, float):
        raise _Refused("arithmetic on a non-number")
    return value


def _checked(value):
    if isinstance(value, complex) or abs(value) > MAX_MAGNITUDE:
        raise _Refused("result too large")
    return value


# ---- the engine ----


class Engine:
    def __init__(self, model, tokenizer, cuda_graphs=True):
        """cuda_graphs=False decodes eagerly on CUDA too (to compare, or to debug)."""
        self.model, self.tokenizer, self.cuda_graphs = model, tokenizer, cuda_graphs
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.stop = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self._graphed = None  # (shape, cache, step) of the last CUDA-graphed batch shape

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Stream num_samples rows for one prompt: yields ([token of each row], [mask of each row])
        per step until every row has stopped (a row's tokens after its stop are meaningless)."""
        for token, sampled in _Batch(self, [tokens], num_samples, max_tokens, temperature, top_k, seed).steps():
            yield token.tolist(), sampled.int().tolist()

    @torch.inference_mode()
    def generate_many(self, prompts, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """[(sequences, masks) per prompt]: its num_samples samples as prompt + reply tokens (the stop
        token left out), masks 0 on the prompt and on forced tool output. max_tokens (default: as
        many as fit) is capped by the model's context; a prompt that fills it is an error."""
        batch = _Batch(self, prompts, num_samples, max_tokens, temperature, top_k, seed)
        for _ in batch.steps():
            pass
        return batch.results()

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """(sequences, masks) of num_samples samples for one prompt."""
        return self.generate_many([tokens], num_samples, **kwargs)[0]

    def release(self):
        """Let go of the kept CUDA graph and its cache (chat_rl trains between rollouts)."""
        self._graphed = None

    def _decoder(self, prompts, group, prompt_len, budget):
        """(cache, step): a cache for `prompts` prompts of `group` rows each, and the decode step
        (tokens (rows,) -> next-token logits before the soft cap (rows, vocab)) over it, CUDA-graphed on CUDA, where the
        shape is kept for the next batch of the same shape (its lengths rounded up to reuse it)."""
        model = self.model

        def eager(cache):
            return lambda tokens: model(tokens[:, None], kv_cache=cache, capped=False)[:, -1]

        if next(model.parameters()).device.type != "cuda" or not self.cuda_graphs:
            cache = KVCache(prompts, group, prompt_len, budget, model)
            return cache, eager(cache)
        shape = (prompts, group, -(-prompt_len // 128) * 128, -(-budget // 128) * 128)
        if self._graphed is None or self._graphed[0] != shape:
            self._graphed = None  # free the old graph's memory first
            cache = KVCache(*shape, model, static=True)
            try:
                step = _CudaGraphStep(eager(cache), cache)
            except Exception as e:  # (e.g. an op that cannot be captured): the same step, eagerly
                logger.warning("decoding without a CUDA graph (capture failed: %s)", e)
                cache = KVCache(*shape, model)
                step = eager(cache)
            self._graphed = (shape, cache, step)
        return self._graphed[1], self._graphed[2]

    def _run_tool(self, tokens):
        """The tokens to force after a row's sampled tokens end in <|python_end|>: the calculator's
        answer to the expression since the last <|python_start|>, or None."""
        starts = [i for i, t in enumerate(tokens) if t == self.python_start]
        if not starts or self.python_end in tokens[starts[-1]:-1]:
            return None  # not inside a call
        result = calculator(self.tokenizer.decode(tokens[starts[-1] + 1 : -1]))
        if result is None:
            return None
        forced = [self.output_start, *self.tokenizer.encode(str(result)), self.output_end]
        return forced if len(forced) <= MAX_FORCED_TOKENS else None


class _Batch:
    """The state of one batch of rows while it decodes (see the module docstring). Each prompt has
    a group of rows, as many as the largest number of samples asked for; rows beyond a prompt's
    own number are idle from the start."""

    def __init__(self, engine, prompts, num_samples, max_tokens, temperature, top_k, seed):
        counts = [num_samples] * len(prompts) if isinstance(num_samples, int) else list(num_samples)
        if not prompts or any(not p for p in prompts):
            raise ValueError("the prompt is empty")
        if len(counts) != len(prompts) or min(counts) < 1:
            raise ValueError(f"num_samples must be at least 1 for each prompt, got {num_samples}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if max_tokens is not None and max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        context = engine.model.config.sequence_len
        if (longest := max(map(len, prompts))) >= context:
            raise ValueError(f"a prompt of {longest} tokens leaves no room in the model's {context}-token context")
        budgets = [min(context - len(p), context if max_tokens is None else max_tokens) for p in prompts]
        group = max(counts)
        self.engine, self.prompts, self.counts, self.group = engine, prompts, counts, group
        self.temperature, self.top_k = temperature, top_k
        rows = len(prompts) * group
        device = next(engine.model.parameters()).device
        self.rng = torch.Generator(device=device).manual_seed(seed)
        if max(budgets) > 0:  # (with nothing to generate, no model call at all)
            self.cache, self.decode = engine._decoder(len(prompts), group, longest, max(budgets))
            self.cache.start(prompts)
            self.logits = torch.cat([self.cache.prefill(engine.model, p, i).expand(group, -1)
                                     for i, p in enumerate(prompts)])
        # Row r's reply is out[r, :end[r]]; end starts at its budget (0 if idle) and drops to where it stops.
        self.end = torch.tensor([b if j < n else 0 for b, n in zip(budgets, counts) for j in range(group)], device=device)
        self.out = torch.zeros(rows, max(budgets), dtype=torch.long, device=device)
        self.sampled = torch.zeros(rows, max(budgets), dtype=torch.bool, device=device)
        self.forced = torch.zeros(rows, MAX_FORCED_TOKENS, dtype=torch.long, device=device)  # tool output to force
        self.forced_len = torch.zeros(rows, dtype=torch.long, device=device)
        self.forced_at = torch.zeros(rows, dtype=torch.long, device=device)  # next forced token of each row
        self.stop_ids = torch.tensor(sorted(engine.stop), device=device)

    def steps(self):
        """Decode until every row has stopped; yields (token (rows,), sampled (rows,) bool) per step."""
        engine = self.engine
        for t in range(self.out.size(1)):
            forcing = self.forced_at < self.forced_len
            next_forced = self.forced.gather(1, self.forced_at.clamp(max=MAX_FORCED_TOKENS - 1)[:, None])[:, 0]
            sampled = sample(self.logits, self.rng, self.temperature, self.top_k, cap=engine.model.config.softcap)
            token = torch.where(forcing, next_forced, sampled)
            self.forced_at += forcing
            self.out[:, t], self.sampled[:, t] = token, ~forcing
            model_turn = ~forcing & (t < self.end)
            self.end = torch.where(model_turn & torch.isin(token, self.stop_ids), t, self.end)
            calling = model_turn & (token == engine.python_end)
            call, finished = torch.stack([calling.any(), (self.end <= t + 1).all()]).tolist()  # the step's one sync
            yield token, ~forcing
            if call:
                for r in calling.nonzero()[:, 0].tolist():
                    if forced := engine._run_tool(self.out[r, : t + 1].tolist()):
                        self.forced[r, : len(forced)] = torch.tensor(forced)
                        self.forced_len[r], self.forced_at[r] = len(forced), 0
            if finished:
                return
            self.logits = self.decode(token)

    def results(self):
        out, sampled, end = self.out.tolist(), self.sampled.tolist(), self.end.tolist()
        results = []
        for i, (prompt, count) in enumerate(zip(self.prompts, self.counts)):
            rows = range(i * self.group, i * self.group + count)
            results.append(([prompt + out[r][: end[r]] for r in rows],
                            [[0] * len(prompt) + [int(m) for m in sampled[r][: end[r]]] for r in rows]))
        return results


_capture_lock = threading.Lock()  # one capture at a time: chat_web's replicas decode in threads


class _CudaGraphStep:
    """A decode step captured once as a CUDA graph; each call replays every kernel of it at once.
    Capture and replay happen on the cache's GPU, whatever the calling thread's current device.
    (Capturing runs the step's Python once: the cache's host-side step counter is not used in a
    static cache, and start() resets everything before the first real step.)"""

    def __init__(self, step, cache):
        self.device = cache.pos.device
        self.tokens = torch.zeros_like(cache.pos)  # the graph's input and output live at fixed addresses
        with _capture_lock, torch.cuda.device(self.device):
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # one run outside the graph: lazy initialisation, workspaces
                step(self.tokens)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):  # recorded, not run
                self.logits = step(self.tokens)

    def __call__(self, tokens):
        with torch.cuda.device(self.device):
            self.tokens.copy_(tokens)
            self.graph.replay()
        return self.logits
