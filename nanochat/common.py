"""
Things every nanochat script needs: where artifacts live, rank-aware printing and logging,
device autodetection, and distributed (torchrun) setup and teardown.

torch is imported inside the functions that need it, so that data tools such as
`python -m nanochat.dataset` start instantly.
"""

import argparse
import logging
import os
import sys


def get_base_dir():
    """Every artifact lives under $NANOCHAT_BASE_DIR (default ~/.cache/nanochat)."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


def get_rank():
    return int(os.environ.get("RANK", 0))


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to a flag's help unless the help already says what its default is, or
    the default is None (unset)."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def make_parser(description, prog=None):
    """Every command's flag parser: flag names must be exact (argparse would otherwise take
    --dept=4 as --depth=4), and --help shows each flag's default beside its description."""
    return argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False, formatter_class=_HelpWithDefaults)


def int_flag(low, *special):
    """A flag type: an integer >= low, or one of the `special` values (e.g. -1 = "the default"). A
    value out of range is argparse's one-line error, not a traceback (or a run) much later."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low and value not in special:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}{''.join(f' or {s}' for s in special)}, got {value}")
        return value

    return parse


def float_flag(low, high=float("inf")):
    """A flag type: a number between low and high, both included."""

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not low <= value <= high:  # (NaN fails this too)
            bounds = f">= {low}" if high == float("inf") else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text}")
        return value

    return parse


def print0(*args, **kwargs):
    """print, but only on rank 0, so 8 ranks don't print everything 8 times."""
    if get_rank() == 0:
        print(*args, **kwargs)


def setup_default_logging(level=logging.INFO):
    """One log format for every script; lines from ranks other than 0 say which rank they are."""
    rank = get_rank()
    prefix = f"[rank {rank}] " if rank else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


logger = logging.getLogger(__name__)


def autodetect_device_type():
    """cuda > mps > cpu."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


DTYPES = ("bfloat16", "float16", "float32")


def compute_dtype(device):
    """The one compute-dtype policy: the dtype of activations, the KV cache and every matmul on
    `device` (weights stay float32 masters; the model casts them). $NANOCHAT_DTYPE decides if set,
    else bfloat16 on CUDA GPUs that have it natively (Ampere on: older ones only emulate it),
    float32 elsewhere (CPU and MPS)."""
    import torch

    device = torch.device(device)
    name = os.environ.get("NANOCHAT_DTYPE")
    if name:
        if name not in DTYPES:
            raise SystemExit(f"error: NANOCHAT_DTYPE={name!r}; expected one of {', '.join(DTYPES)}")
        return getattr(torch, name)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    return torch.float32


def get_dist_info():
    """(is_ddp, rank, local_rank, world_size) from the environment torchrun sets."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def compute_init(device_type=None, seed=42):
    """
    Set up the device and, under torchrun, the process group (nccl on CUDA, gloo otherwise).
    Returns (is_ddp, rank, local_rank, world_size, device).
    """
    import torch
    import torch.distributed as dist

    device_type = device_type or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device_type=cuda but no CUDA device is available; use --device_type=cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("error: --device_type=mps but MPS is not available; use --device_type=cpu")
    if device_type not in ("cuda", "mps", "cpu"):
        raise SystemExit(f"error: unknown --device_type={device_type!r}; expected cuda, mps or cpu")

    # Same seed on every rank: identical initial weights; the data differs per rank.
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    is_ddp, rank, local_rank, world_size = get_dist_info()
    if is_ddp:
        # Before the group exists: torch.distributed.nn.functional binds the default group as its
        # functions' default arguments when first imported (torch.optim imports it, through dynamo),
        # and that reference would keep the group, and gloo's threads, alive past
        # destroy_process_group into interpreter exit, where their teardown can abort.
        import torch.distributed.nn  # noqa: F401
    if is_ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    elif is_ddp:
        device = torch.device(device_type)
        dist.init_process_group(backend="gloo")
    else:
        device = torch.device(device_type)
    if is_ddp:
        dist.barrier()
    logger.info("device %s, compute dtype %s, world size %d", device, str(compute_dtype(device)).removeprefix("torch."), world_size)
    return is_ddp, rank, local_rank, world_size, device


def compute_cleanup():
    """Tear down the process group if compute_init made one (its gloo threads are joined here, not
    at interpreter exit: see compute_init). Ranks wait for each other first: one tearing down gloo
    while another still talks to it can abort ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class DummyWandb:
    """Stands in for a wandb run when logging is off (`--run=dummy`): every call does nothing."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass
