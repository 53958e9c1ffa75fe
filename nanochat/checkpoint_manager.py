"""
Checkpoints: $NANOCHAT_BASE_DIR/<phase>_checkpoints/<model tag>/ holds, for each saved step,
  model_<step>.pt              the weights (rank 0)
  optim_<step>_rank<r>.pt      each rank's optimizer state (it is sharded across ranks)
  meta_<step>.json             configs, step, loop and loader state, RNG states, val bpb
Every file is written to a temp name and renamed; meta is written last, so a step whose meta
exists is complete. Older steps beyond the last `keep` are deleted.
"""

import dataclasses
import glob
import json
import os
import re

import torch
import torch.distributed as dist

from nanochat.common import get_base_dir
from nanochat.gpt import GPT, GPTConfig

PHASE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}


def checkpoint_dir(phase, model_tag):
    if phase not in PHASE_DIRS:
        raise ValueError(f"unknown phase {phase!r}; expected one of {sorted(PHASE_DIRS)}")
    return os.path.join(get_base_dir(), PHASE_DIRS[phase], model_tag)


def _save_atomic(obj, path):
    tmp = f"{path}.tmp"
    if path.endswith(".json"):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(folder, step, model, optimizers, meta, rank=0, keep=2):
    """Called by every rank: each writes its optimizer shard, rank 0 the model, then the meta."""
    os.makedirs(folder, exist_ok=True)
    _save_atomic([opt.state_dict() for opt in optimizers], os.path.join(folder, f"optim_{step:06d}_rank{rank}.pt"))
    if rank == 0:
        state = {k.removeprefix("_orig_mod."): v for k, v in model.state_dict().items()}
        _save_atomic(state, os.path.join(folder, f"model_{step:06d}.pt"))
    _barrier()  # every shard is on disk before the meta marks the step complete
    if rank == 0:
        _save_atomic(meta, os.path.join(folder, f"meta_{step:06d}.json"))
        older = [s for s in saved_steps(folder) if s < step]  # never a later step (a stale run's)
        for old in older[: len(older) - (keep - 1)] if keep > 0 else []:
            for path in glob.glob(os.path.join(folder, f"*_{old:06d}*")):
                os.remove(path)
    _barrier()


def saved_steps(folder):
    """Steps with a complete checkpoint in `folder`, ascending."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"meta_(\d+)\.json", n)))


def load_checkpoint(folder, step, device, rank=0, with_optimizer=True):
    """(model state, list of optimizer states or None, meta) of one saved step."""
    paths = {"meta": os.path.join(folder, f"meta_{step:06d}.json"), "model": os.path.join(folder, f"model_{step:06d}.pt")}
    if with_optimizer:
        paths["optim"] = os.path.join(folder, f"optim_{step:06d}_rank{rank}.pt")
    for path in paths.values():
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint file {path} is missing; pick another step or retrain")
    try:
        with open(paths["meta"]) as f:
            meta = json.load(f)
        model_state = torch.load(paths["model"], map_location=device)
        optim_state = torch.load(paths["optim"], map_location=device) if with_optimizer else None
    except Exception as e:  # a truncated or garbled file
        raise ValueError(f"checkpoint step {step} in {folder} is corrupt ({type(e).__name__}: {e}); delete it or pick another step") from None
    return model_state, optim_state, meta


def build_model(model_state, meta, device):
    """A GPT with the saved weights (float32 masters; the model computes in its device's dtype), in eval mode."""
    unknown = sorted(set(meta["model_config"]) - {f.name for f in dataclasses.fields(GPTConfig)})
    if unknown:  # an option that was tried and removed (dev/bench/RESULTS.md)
        raise ValueError(f"checkpoint's model has options this nanochat does not have ({', '.join(unknown)}); "
                         "load it with the version that trained it")
    config = GPTConfig(**meta["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # the non-persistent rotary tables
    model.load_state_dict({k: v.float() for k, v in model_state.items()}, strict=True, assign=True)
    model.eval()
    return model


def find_model_tag(phase):
    """The most recently written model tag of a phase."""
    root = os.path.join(get_base_dir(), PHASE_DIRS[phase])
    tags = [t for t in (os.listdir(root) if os.path.isdir(root) else []) if saved_steps(os.path.join(root, t))]
    if not tags:
        raise FileNotFoundError(f"no {phase} checkpoints in {root}; train one first")
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(root, t)))


def load_model(source, device, phase="eval", model_tag=None, step=None):
    """(model, tokenizer, meta) from the newest (or given) checkpoint of `source`
    (base | mid | sft | rl). `phase` is "train" (train mode, float32 master weights) or "eval"
    (eval mode, weights stored in the compute dtype: no cast per forward, half the memory on GPU)."""
    from nanochat.tokenizer import get_tokenizer

    device = torch.device(device)
    model_tag = model_tag or find_model_tag(source)
    folder = checkpoint_dir(source, model_tag)
    steps = saved_steps(folder)
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {folder}")
    step = steps[-1] if step is None else step
    model_state, _, meta = load_checkpoint(folder, step, device, with_optimizer=False)
    model = build_model(model_state, meta, device)
    if phase == "train":
        model.train()
    else:
        model.to(model.compute_dtype)
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, the model {model.config.vocab_size}; retrain one of them")
    return model, tokenizer, meta
