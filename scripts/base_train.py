"""
Pretrain the GPT on FineWeb-Edu.

    python -m scripts.base_train --depth=4 --max_seq_len=256 --device_batch_size=8 --total_batch_size=4096
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20
"""

import argparse
import base64
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import checkpoint_dir, load_checkpoint, save_checkpoint, saved_steps
from nanochat.common import DummyWandb, compute_cleanup, compute_init, print0, setup_default_logging
from nanochat.core_eval import eval_bundle_dir, evaluate_core
from nanochat.dataloader import cropped_fraction, tokenizing_distributed_data_loader
from nanochat.download import DownloadError
from nanochat.gpt import GPT, config_for_depth
from nanochat.loss_eval import EVAL_LOADER_KWARGS, evaluate_bpb
from nanochat.optim import step_optimizers
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training import StopRequest, lr_multiplier, muon_momentum, parse_args, peak_flops

parser = argparse.ArgumentParser(description="Pretrain the GPT.")
# logging and hardware
parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
parser.add_argument("--device_type", default=None, help="cuda|mps|cpu (default: autodetect)")
parser.add_argument("--compile", type=int, default=None, help="torch.compile the model (default: 1 on CUDA)")
# model
parser.add_argument("--depth", type=int, default=20, help="layers; width = 64 * depth")
parser.add_argument("--max_seq_len", type=int, default=2048)
# horizon: the first that is set wins
parser.add_argument("--num_iterations", type=int, default=-1, help="optimizer steps (-1: from flops or data ratio)")
parser.add_argument("--target_flops", type=float, default=-1.0, help="training FLOPs budget")
parser.add_argument("--target_param_data_ratio", type=float, default=20, help="tokens per parameter (Chinchilla: 20)")
# batch
parser.add_argument("--device_batch_size", type=int, default=32, help="sequences per rank per forward/backward")
parser.add_argument("--total_batch_size", type=int, default=524288, help="tokens per optimizer step")
# optimization
parser.add_argument("--embedding_lr", type=float, default=0.2)
parser.add_argument("--unembedding_lr", type=float, default=0.004)
parser.add_argument("--matrix_lr", type=float, default=0.02)
parser.add_argument("--weight_decay", type=float, default=0.0)
parser.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
parser.add_argument("--warmup_ratio", type=float, default=0.0)
parser.add_argument("--warmdown_ratio", type=float, default=0.2)
parser.add_argument("--final_lr_frac", type=float, default=0.0)
# evaluation, sampling, checkpoints
parser.add_argument("--eval_every", type=int, default=250, help="val bits/byte every N steps (0 = only at the end)")
parser.add_argument("--eval_tokens", type=int, default=-1, help="val tokens per evaluation (-1: 20 x total_batch_size)")
parser.add_argument("--core_metric_every", type=int, default=2000, help="CORE every N steps (-1 = never; the full one is scripts.base_eval)")
parser.add_argument("--core_metric_max_per_task", type=int, default=500, help="items per CORE task during training")
parser.add_argument("--sample_every", type=int, default=2000, help="greedy samples every N steps (0 = only at the end)")
parser.add_argument("--save_every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
parser.add_argument("--keep_checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
parser.add_argument("--resume", default="", help="'auto' = the latest checkpoint of this model tag, or a step number")
parser.add_argument("--model_tag", default=None, help="checkpoint folder name (default: d<depth>)")

SAMPLE_PROMPTS = [
    "The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is", "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is",
]


def rng_states(device):
    states = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if device.type == "cuda":
        states["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode()
    return states


def restore_rng(states, device):
    def tensor(s):
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(states["cpu"]))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(tensor(states["cuda"]), device)


def horizon(args, num_params, flops_per_token):
    if args.num_iterations > 0:
        return args.num_iterations
    if args.target_flops > 0:
        return max(1, round(args.target_flops / (flops_per_token * args.total_batch_size)))
    if args.target_param_data_ratio > 0:
        return max(1, round(args.target_param_data_ratio * num_params / args.total_batch_size))
    raise SystemExit("error: set one of --num_iterations, --target_flops, --target_param_data_ratio")


def main():
    args = parse_args(parser)
    setup_default_logging()
    is_ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    master = rank == 0
    use_compile = bool(args.compile) if args.compile is not None else device.type == "cuda"
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    if args.run != "dummy" and master:
        import wandb

        wandb_run = wandb.init(project="nanochat", name=args.run, config=vars(args))
    else:
        wandb_run = DummyWandb()

    # Tokenizer and model
    try:
        tokenizer = get_tokenizer()
        token_bytes = get_token_bytes(device)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}")
    config = config_for_depth(args.depth, tokenizer.get_vocab_size(), args.max_seq_len)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    num_params, flops_per_token = model.num_params(), model.estimate_flops()
    num_iterations = horizon(args, num_params, flops_per_token)

    # Batch: sequences per rank per micro-step, micro-steps per optimizer step
    tokens_per_micro = args.device_batch_size * args.max_seq_len * world_size
    if args.total_batch_size % tokens_per_micro:
        raise SystemExit(f"error: --total_batch_size={args.total_batch_size} is not a multiple of device_batch_size x "
                         f"max_seq_len x ranks = {tokens_per_micro}; change one of them")
    grad_accum = args.total_batch_size // tokens_per_micro
    print0(f"model: {config}")
    print0(f"parameters: {num_params:,} | FLOPs/token: {flops_per_token:.3e} | steps: {num_iterations:,} | "
           f"tokens: {num_iterations * args.total_batch_size:,} ({num_iterations * args.total_batch_size / num_params:.1f}/param) | "
           f"grad accumulation: {grad_accum} | total FLOPs: {flops_per_token * args.total_batch_size * num_iterations:.3e}")
    optimizers = model.setup_optimizers(args.unembedding_lr, args.embedding_lr, args.matrix_lr, args.weight_decay)
    adamw, muon = optimizers

    # Resume
    folder = checkpoint_dir("base", args.model_tag or f"d{args.depth}")
    step, loop, loader_state = 0, {"smooth_loss": 0.0, "training_time": 0.0, "val_bpb": None, "min_val_bpb": None}, None
    if args.resume:
        steps = saved_steps(folder)
        if not steps:
            raise SystemExit(f"error: --resume={args.resume} but there is no checkpoint in {folder}")
        resume_step = steps[-1] if args.resume == "auto" else int(args.resume)
        try:
            model_state, optim_states, meta = load_checkpoint(folder, resume_step, device, rank)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}")
        if meta["world_size"] != world_size or meta["model_config"] != vars(config):
            raise SystemExit(f"error: checkpoint {folder} step {resume_step} was made with another model or number of ranks")
        model.load_state_dict(model_state)
        for opt, state in zip(optimizers, optim_states):
            opt.load_state_dict(state)
        step, loop, loader_state = meta["step"], meta["loop_state"], meta["loader_state"][rank]
        restore_rng(meta["rng"][rank], device)
        print0(f"resumed from {folder} at step {step}")

    start_step = step  # a resumed run does not save again the step it started from
    B, T = args.device_batch_size, args.max_seq_len
    eval_tokens = args.eval_tokens if args.eval_tokens > 0 else 20 * args.total_batch_size
    try:
        train_loader = tokenizing_distributed_data_loader(tokenizer, B, T, "train", device, resume_state=loader_state)
        tokenizing_distributed_data_loader(tokenizer, B, T, "val", device)  # fail now, not at the first eval
        if 0 < args.core_metric_every <= num_iterations:
            eval_bundle_dir()
    except (FileNotFoundError, ValueError, DownloadError) as e:
        raise SystemExit(f"error: {e}")
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    stop = StopRequest()
    peak = peak_flops(device)
    t_start = time.time()
    while True:
        last_step = step == num_iterations
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            model.eval()
            val_loader = tokenizing_distributed_data_loader(tokenizer, B, T, "val", device, **EVAL_LOADER_KWARGS)
            with autocast:
                bpb = evaluate_bpb(model, val_loader, max(1, eval_tokens // (B * T * world_size)), token_bytes)
            model.train()
            loop["val_bpb"] = bpb
            loop["min_val_bpb"] = bpb if loop["min_val_bpb"] is None else min(loop["min_val_bpb"], bpb)
            print0(f"step {step:05d} | val bpb: {bpb:.6f}")
            wandb_run.log({"step": step, "val/bpb": bpb})
        if args.core_metric_every > 0 and step > 0 and step % args.core_metric_every == 0:
            model.eval()
            with autocast:
                core = evaluate_core(model, tokenizer, device, args.core_metric_max_per_task, rank, world_size)["core"]
            model.train()
            loop["core_metric"] = core
            print0(f"step {step:05d} | CORE: {core:.4f}")
            wandb_run.log({"step": step, "core_metric": core})
        if master and (last_step or (args.sample_every > 0 and step > 0 and step % args.sample_every == 0)):
            model.eval()
            with autocast:
                for prompt in SAMPLE_PROMPTS:
                    ids = tokenizer.encode(prompt, prepend="<|bos|>")
                    print0("sample: " + prompt + tokenizer.decode(list(model.generate(ids, 16, temperature=0))))
            model.train()
        stopping = stop.check(device)
        if last_step or stopping or (args.save_every > 0 and step % args.save_every == 0 and step != start_step):
            loader_states, rngs = [loader_state], [rng_states(device)]
            if is_ddp:
                loader_states, rngs = [None] * world_size, [None] * world_size
                dist.all_gather_object(loader_states, loader_state)
                dist.all_gather_object(rngs, rng_states(device))
            meta = {"step": step, "model_config": vars(config), "user_config": vars(args), "world_size": world_size,
                    "loop_state": loop, "loader_state": loader_states, "rng": rngs, "val_bpb": loop["val_bpb"]}
            save_checkpoint(folder, step, model, optimizers, meta, rank, keep=args.keep_checkpoints)
            print0(f"saved checkpoint at step {step} to {folder}")
        if stopping:
            print0(f"stopped at step {step}; continue with the same command plus --resume=auto")
            break
        if last_step:
            break

        # One optimizer step: grad_accum micro-batches, then the optimizers (which average across ranks)
        t0 = time.time()
        for _ in range(grad_accum):
            x, y, loader_state = next(train_loader)
            with autocast:
                loss = train_model(x, y)
            (loss / grad_accum).backward()
        lrm = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(step)
        grad_norm = step_optimizers(optimizers, args.grad_clip)
        model.zero_grad(set_to_none=True)
        train_loss = loss.item()  # synchronizes with the device, so the step time below is real
        dt = time.time() - t0
        step += 1

        # Logging: an exponential moving average of the loss, debiased for the first steps
        beta = 0.9
        loop["smooth_loss"] = beta * loop["smooth_loss"] + (1 - beta) * train_loss
        smooth = loop["smooth_loss"] / (1 - beta ** step)
        if step > 10:  # the first steps include compilation and warmup
            loop["training_time"] += dt
        tok_per_sec = args.total_batch_size / dt
        mfu = f"{100 * flops_per_token * tok_per_sec / (peak * world_size):.2f}%" if peak else "n/a"
        avg_dt = loop["training_time"] / (step - 10) if step > 10 else dt
        eta = (num_iterations - step) * avg_dt
        print0(f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.2f}%) | loss: {smooth:.6f} | "
               f"lrm: {lrm:.2f} | grad norm: {grad_norm:.4f} | dt: {dt * 1000:.1f}ms | tok/sec: {tok_per_sec:,.0f} | "
               f"mfu: {mfu} | cropped: {100 * cropped_fraction(loader_state):.1f}% | eta: {eta / 60:.1f}m")
        wandb_run.log({"step": step, "train/loss": smooth, "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_per_sec})

    print0(f"done: {step} steps, min val bpb {loop['min_val_bpb']}, {(time.time() - t_start) / 60:.2f} min wall")
    get_report().log(section="Base model training", data=[
        vars(args),
        {"parameters": num_params, "flops_per_token": flops_per_token, "steps": step, "tokens": step * args.total_batch_size,
         "min_val_bpb": loop["min_val_bpb"], "final_val_bpb": loop["val_bpb"], "training_time_min": loop["training_time"] / 60},
    ])
    wandb_run.finish()
    compute_cleanup()


if __name__ == "__main__":
    main()
