"""Bits per byte: the model's loss in a tokenizer-independent unit.

Validation scores whole documents in their order in the shard, BOS-separated and cut into
consecutive windows of T + 1 tokens ("concat" packing, nothing dropped), so its number does not
depend on how training packs rows: best-fit rows would score mostly the first T tokens of each
document, which are easier than the rest. Every evaluation reads from the start of the split.
"""

# Whole documents in order; a small buffer starts fast (evaluation reads few batches).
EVAL_LOADER_KWARGS = dict(packing="concat", buffer_docs=128, tokenizer_batch=128)

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """
    Sum the loss (nats) over every target token and divide by the bytes those tokens stand for.
    Targets that are special tokens (0 bytes) or ignored (-1) count for neither. Sums are taken
    over all ranks, so every rank gets the same answer.
    """
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(steps):
        x, y = next(batches)[:2]
        loss = model(x, y, loss_reduction="none").view(-1)
        y = y.reshape(-1)
        nbytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
        counted = nbytes > 0
        total_nats += loss[counted].double().sum()
        total_bytes += nbytes.double().sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())
