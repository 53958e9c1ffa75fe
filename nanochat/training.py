"""Pieces every training stage shares: schedules, throughput accounting, graceful stopping."""

import signal
import sys

import torch
import torch.distributed as dist

from nanochat.common import print0


def parse_args(parser, argv=None):
    """Parse flags, tolerating the `--` that `torchrun -m module -- --flag` passes through, and
    print the resolved config."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args([a for a in argv if a != "--"])
    print0("config: " + ", ".join(f"{k}={v}" for k, v in vars(args).items()))
    return args


def lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """Linear warmup, constant, then linear warmdown to final_lr_frac over the last part."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step, start=0.85, end=0.95, ramp_steps=300):
    """Muon's momentum ramps up over the first steps, when the loss landscape changes fastest."""
    frac = min(step / ramp_steps, 1.0)
    return (1 - frac) * start + frac * end


# Dense bf16 peak FLOP/s by GPU name, for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12, "4090": 165e12, "3090": 71e12}


def peak_flops(device):
    """The device's peak bf16 FLOP/s, or None where unknown (CPU, MPS, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step, so a run can finish its
    step, save and exit cleanly. Under torchrun all ranks agree: if one was signalled, all stop."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def check(self, device):
        flag = torch.tensor([int(self.requested)], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
