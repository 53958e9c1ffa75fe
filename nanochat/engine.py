"""
Inference: a preallocated KV cache, batched sampling from one prefilled prompt, and the python
calculator tool.

    engine = Engine(model, tokenizer)
    for tokens, masks in engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8):
        ...   # one token per row per step; mask 0 marks tokens the engine forced (tool output)
"""

import ast
import operator
import time
from collections import deque

import torch
import torch.nn.functional as F

from nanochat.gpt import sample


class KVCache:
    """Keys and values of every layer for a batch of rows, preallocated and grown on demand.
    The model calls insert_kv(layer, k, v) with (B, heads, T, head_dim) tensors and gets back
    everything cached so far for that layer; the position advances after the last layer."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype=torch.float32):
        self.shape = (num_layers, batch_size, num_heads, seq_len, head_dim)
        self.k = torch.empty(self.shape, device=device, dtype=dtype)
        self.v = torch.empty(self.shape, device=device, dtype=dtype)
        self.pos = 0

    def get_pos(self):
        return self.pos

    def insert_kv(self, layer, k, v):
        end = self.pos + k.size(2)
        if end > self.k.size(3):  # grow: double, and at least enough
            grow = max(end, 2 * self.k.size(3)) - self.k.size(3)
            pad = (0, 0, 0, grow)
            self.k, self.v = F.pad(self.k, pad), F.pad(self.v, pad)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        if layer == self.k.size(0) - 1:
            self.pos = end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def prefill_from(self, other):
        """Copy a 1-row cache into every row of this one (one prompt, many samples)."""
        n = other.pos
        if n > self.k.size(3):
            raise ValueError("this cache is shorter than the prompt")
        self.k[:, :, :, :n] = other.k[:, :, :, :n]
        self.v[:, :, :, :n] = other.v[:, :, :, :n]
        self.pos = n


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


class _Row:
    """One sample's decoding state: tokens to force next, and a python call being collected."""

    def __init__(self):
        self.forced = deque()
        self.python = None  # tokens since <|python_start|>, while inside a call
        self.done = False


class Engine:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.stop = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}

    def _cache(self, rows, length):
        c = self.model.config
        device = next(self.model.parameters()).device
        return KVCache(rows, c.n_kv_head, length, c.n_embd // c.n_head, c.n_layer, device, self.model.compute_dtype)

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Yield (token of each row, mask of each row) per step until every row has stopped
        (at <|assistant_end|> or <|bos|>) or max_tokens steps were taken."""
        if not tokens:
            raise ValueError("the prompt is empty")
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        device = next(self.model.parameters()).device
        rng = torch.Generator(device=device).manual_seed(seed)

        # Prefill the prompt once, then share it with every row.
        prompt_cache = self._cache(1, len(tokens))
        logits = self.model(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=prompt_cache)[:, -1, :]
        cache = self._cache(num_samples, len(tokens) + (max_tokens or 256))
        cache.prefill_from(prompt_cache)
        logits = logits.expand(num_samples, -1)

        rows = [_Row() for _ in range(num_samples)]
        steps = 0
        while (max_tokens is None or steps < max_tokens) and not all(r.done for r in rows):
            sampled = sample(logits, rng, temperature, top_k).tolist()
            out, masks = [], []
            for row, token in zip(rows, sampled):
                forced = bool(row.forced)
                token = row.forced.popleft() if forced else token
                out.append(token)
                masks.append(0 if forced else 1)
                self._follow_tool(row, token)
            yield out, masks
            steps += 1
            logits = self.model(torch.tensor(out, dtype=torch.long, device=device)[:, None], kv_cache=cache)[:, -1, :]

    def _follow_tool(self, row, token):
        if token in self.stop:
            row.done = True
        elif token == self.python_start:
            row.python = []
        elif token == self.python_end and row.python is not None:
            result = calculator(self.tokenizer.decode(row.python))
            row.python = None
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(str(result)), self.output_end])
        elif row.python is not None:
            row.python.append(token)

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Finished sequences (prompt + generated, without the stop token) and their masks."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for step_tokens, step_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(step_tokens, step_masks)):
                if done[i]:
                    continue
                if token in self.stop:
                    done[i] = True
                    continue
                results[i].append(token)
                masks[i].append(mask)
        return results, masks
