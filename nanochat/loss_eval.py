"""Bits per byte: the model's loss in a tokenizer-independent unit."""

# Evaluation reads few batches: a small packing buffer starts fast (and the val shard is small).
EVAL_LOADER_KWARGS = dict(buffer_docs=128, tokenizer_batch=128)

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
