"""
What every training stage (base, mid, SFT, RL) shares: the common flags, the learning-rate
schedule, graceful stopping, and the Trainer that runs the loop: gradient accumulation, the
optimizer step, logging (loss, tokens/s, MFU), evaluation hooks and checkpoints that resume
exactly. A stage script supplies only its model source, its batches and its loss.
"""

import argparse
import base64
import gc
import signal
import sys
import time

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import checkpoint_dir, load_checkpoint, save_checkpoint, saved_steps
from nanochat.common import DummyWandb, float_flag, get_dist_info, int_flag, print0
from nanochat.optim import step_optimizers
from nanochat.report import get_report


def parse_args(parser, argv=None):
    """Parse flags, tolerating the `--` that `torchrun -m module -- --flag` passes through, and
    print the resolved config."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args([a for a in argv if a != "--"])
    print0("config: " + ", ".join(f"{k}={v}" for k, v in vars(args).items()))
    return args


def batch_size_flag(value):
    """--device_batch_size: a number, or 'auto'."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', got {value!r}")
    return int(value)


def add_common_flags(parser, *, device_batch_size, eval_every, init_lr_frac=1.0, warmup_ratio=0.0,
                     warmdown_ratio=0.2, final_lr_frac=0.0, momentum_cooldown=0.0, source=None):
    """The flags every stage takes, with the same meaning everywhere (defaults differ by stage)."""
    g = parser.add_argument_group("shared by every training stage")
    g.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    g.add_argument("--device_type", default=None, help="cuda|mps|cpu (default: autodetect)")
    g.add_argument("--compile", type=int, default=None, help="torch.compile the model (default: 1 on CUDA for fixed-shape stages)")
    if source:
        g.add_argument("-i", "--source", choices=["base", "mid", "sft", "rl"], default=source, help="the stage to start from")
        g.add_argument("--source_step", type=int, default=None, help="its checkpoint step (default: the last)")
    g.add_argument("--device_batch_size", type=batch_size_flag, default="auto",
                   help=f"sequences per rank per forward/backward; auto: the largest that fits on a CUDA GPU, "
                        f"{device_batch_size} elsewhere (gradient accumulation makes up the rest of the step)")
    parser.set_defaults(device_batch_size_off_cuda=device_batch_size)
    g.add_argument("--num_iterations", type=int_flag(1, -1), default=-1, help="optimizer steps (-1: the stage's natural length)")
    g.add_argument("--embedding_lr", type=float_flag(0), default=0.2, help="AdamW LR of the token and value embeddings (at width 768)")
    g.add_argument("--unembedding_lr", type=float_flag(0), default=0.004, help="AdamW LR of the lm_head (at width 768)")
    g.add_argument("--matrix_lr", type=float_flag(0), default=0.02, help="Muon LR of the blocks' matrices")
    g.add_argument("--scalar_lr", type=float_flag(0), default=0.02, help="AdamW LR of the small parameters outside the blocks (residual scalars, smear)")
    g.add_argument("--weight_decay", type=float_flag(0), default=0.0, help="AdamW weight decay of the embeddings and lm_head")
    g.add_argument("--matrix_weight_decay", type=float_flag(0), default=0.0, help="Muon's cautious weight decay (times the LR)")
    g.add_argument("--newton_schulz", choices=["classic", "polar"], default="classic", help="Muon's orthogonalization")
    g.add_argument("--equilibrate_rows", type=int, choices=[0, 1], default=0,
                   help="1 = MuonEq-R: each row of Muon's momentum at unit norm before orthogonalizing")
    g.add_argument("--normuon_beta2", type=float_flag(0, 1), default=0.0, help="NorMuon's per-row normalization EMA (0 = off)")
    g.add_argument("--momentum_warmup", type=int_flag(0), default=300, help="steps over which Muon's momentum ramps from 0.85 to 0.95")
    g.add_argument("--momentum_cooldown", type=float_flag(0, 1), default=momentum_cooldown,
                   help="fraction of the steps at the end over which Muon's momentum ramps back down to 0.85")
    g.add_argument("--init_lr_frac", type=float_flag(0), default=init_lr_frac, help="start at this fraction of the LRs above")
    g.add_argument("--warmup_ratio", type=float_flag(0, 1), default=warmup_ratio, help="fraction of the steps that ramp the LRs up")
    g.add_argument("--warmdown_ratio", type=float_flag(0, 1), default=warmdown_ratio, help="fraction of the steps that ramp the LRs down at the end")
    g.add_argument("--final_lr_frac", type=float_flag(0, 1), default=final_lr_frac, help="the LRs at the last step, as a fraction of their peak")
    g.add_argument("--grad_clip", type=float_flag(0), default=1.0, help="clip the global gradient norm (0 = off)")
    g.add_argument("--eval_every", type=int_flag(-1), default=eval_every, help="evaluate every N steps (0 = only at the end)")
    g.add_argument("--save_every", type=int_flag(1, -1), default=-1, help="checkpoint every N steps (-1 = only at the end)")
    g.add_argument("--keep_checkpoints", type=int_flag(1), default=2, help="how many recent checkpoints to keep")
    g.add_argument("--resume", default="", help="'auto' = the latest checkpoint of this model tag if any, or a step number")
    g.add_argument("--model_tag", default=None, help="checkpoint folder name (default: the source's, or d<depth>)")
    g.add_argument("--dry_run", type=int, default=0, help="1 = train and evaluate, but write no checkpoint or report")


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


def muon_momentum(step, num_iterations, warmup_steps, cooldown_ratio, low=0.85, high=0.95):
    """Muon's momentum ramps up over the first steps, while the loss landscape changes fastest, and
    optionally back down over the last ones, so the final updates average fewer stale gradients."""
    up = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    cooldown = round(cooldown_ratio * num_iterations)
    down = min((num_iterations - step) / cooldown, 1.0) if cooldown > 0 else 1.0
    frac = min(up, down)
    return (1 - frac) * low + frac * high


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


AUTO_BATCH_SIZES = (64, 32, 16, 8, 4, 2, 1)  # tried largest first; more than 64 rows gains little


def fits_in_memory(model, batch_size, seq_len, device, reserve_bytes):
    """Whether a training micro-step of (batch_size, seq_len) tokens runs without running out of
    memory with every gradient already allocated (as from a step's second micro-batch on) and
    `reserve_bytes` held aside. Leaves no gradients behind."""
    try:
        held = torch.empty(reserve_bytes, dtype=torch.uint8, device=device)  # noqa: F841 -- taken while the step runs
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        x = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        model(x, x).backward()
        return True
    except RuntimeError as e:  # torch.OutOfMemoryError, or a library (cuBLAS) failing to allocate
        if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e) and "ALLOC_FAILED" not in str(e):
            raise
        return False
    finally:
        model.zero_grad(set_to_none=True)


def largest_fitting_batch_size(model, candidates, seq_len, device, reserve_bytes):
    """The first of `candidates` (largest first) that fits_in_memory, and the ones that did not."""
    too_big = []
    for batch_size in candidates:
        fits = fits_in_memory(model, batch_size, seq_len, device, reserve_bytes)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # give the probe's memory back before the next try, or training
        if fits:
            return batch_size, too_big
        too_big.append(batch_size)
    return None, too_big


def _rng_states(device):
    states = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if device.type == "cuda":
        states["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode()
    return states


def _restore_rng(states, device):
    def tensor(s):
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(states["cpu"]))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(tensor(states["cuda"]), device)


def _gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class Trainer:
    """
    The loop. Each step: `grad_accum` micro-batches (`next_batch()` -> batch,
    `loss_fn(model, batch)` -> mean loss), learning rates from the schedule, one optimizer step
    (gradients averaged across ranks, clipped). Before each step, `evaluate(step, last)` may
    evaluate and return metrics to log. Checkpoints (every --save_every steps, at the end, and
    on SIGTERM/SIGINT) hold the weights, optimizer shards, loop state, RNG states and each rank's
    `data_state()`, so that --resume continues with exactly the same numbers.
    """

    def __init__(self, args, phase, model, device, num_iterations, tokens_per_step, default_tag, fixed_shapes=True):
        """tokens_per_step: a number, or a function giving the last step's (for throughput).
        fixed_shapes: every batch has the same shape, so --compile defaults to on for CUDA (a stage
        whose batch widths vary would recompile for each new width)."""
        if model.compute_dtype == torch.float16:  # its gradients underflow without loss scaling
            raise SystemExit("error: NANOCHAT_DTYPE=float16 can evaluate and chat but not train (float16 training "
                             "needs loss scaling, which nanochat leaves out); use bfloat16 or float32")
        self.args, self.phase, self.model, self.device = args, phase, model, device
        self.num_iterations, self.tokens_per_step = num_iterations, tokens_per_step
        _, self.rank, _, self.world_size = get_dist_info()
        self.optimizers = model.setup_optimizers(
            args.unembedding_lr, args.embedding_lr, args.matrix_lr, args.weight_decay, args.scalar_lr,
            args.matrix_weight_decay, args.newton_schulz, args.normuon_beta2, bool(args.equilibrate_rows))
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["initial_lr"] *= args.init_lr_frac
                group["lr"] = group["initial_lr"]
        self.folder = checkpoint_dir(phase, args.model_tag or default_tag)
        self.step, self.loop = 0, {"smooth_loss": 0.0, "training_time": 0.0}
        use_compile = bool(args.compile) if args.compile is not None else device.type == "cuda" and fixed_shapes
        self.train_model = torch.compile(model, dynamic=False) if use_compile else model
        self.wandb = DummyWandb()  # a real run starts with fit(), once every flag has been checked

    def device_batch_size(self, seq_len, allowed=lambda b: True):
        """--device_batch_size, with 'auto' resolved to the largest of AUTO_BATCH_SIZES that `allowed`
        accepts and, on CUDA, whose training step at seq_len tokens fits beside the optimizer state
        (and 5% headroom), the same on every rank; off CUDA, at most the stage's default."""
        args = self.args
        if args.device_batch_size != "auto":
            return args.device_batch_size
        candidates, default = [b for b in AUTO_BATCH_SIZES if allowed(b)], args.device_batch_size_off_cuda
        if not candidates:  # the stage's own check will say why
            return default
        if self.device.type != "cuda":
            chosen = next((b for b in candidates if b <= default), candidates[-1])
            print0(f"device batch size: {chosen} (auto off CUDA: the largest that splits the step, up to {default})")
            return chosen
        total = torch.cuda.get_device_properties(self.device).total_memory
        reserve = sum(opt.state_bytes() for opt in self.optimizers) + total // 20  # (no state exists before step 1)
        found, too_big = largest_fitting_batch_size(self.train_model, candidates, seq_len, self.device, reserve)
        chosen = torch.tensor([found or 0], device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(chosen, op=dist.ReduceOp.MIN)
        if not chosen.item():
            raise SystemExit(f"error: no device batch size of {candidates} fits a {seq_len}-token training step in "
                             f"{total / 2**30:.0f} GiB; lower --max_seq_len or --depth")
        why = f"{', '.join(map(str, too_big))} ran out of memory" if too_big else "the largest allowed"
        print0(f"device batch size: {chosen.item()} (auto, of {candidates}: {why}; {total / 2**30:.0f} GiB GPU, "
               f"{reserve / 2**30:.1f} GiB kept for the optimizer state and headroom)")
        return chosen.item()

    def resume(self):
        """Load the --resume checkpoint (if asked); returns this rank's data state, or None."""
        if not self.args.resume:
            if saved_steps(self.folder) and not self.args.dry_run:
                raise SystemExit(f"error: {self.folder} holds checkpoints of an earlier run; continue it with "
                                 "--resume=auto, or pick another --model_tag, or delete the folder")
            return None
        steps = saved_steps(self.folder)
        if not steps and self.args.resume == "auto":
            print0(f"--resume=auto: no checkpoint in {self.folder} yet; starting from the beginning")
            return None
        if not steps:
            raise SystemExit(f"error: --resume={self.args.resume} but there is no checkpoint in {self.folder}")
        step = steps[-1] if self.args.resume == "auto" else int(self.args.resume)
        try:
            model_state, optim_states, meta = load_checkpoint(self.folder, step, self.device, self.rank)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}")
        if meta["world_size"] != self.world_size or meta["model_config"] != vars(self.model.config):
            raise SystemExit(f"error: checkpoint {self.folder} step {step} was made with another model or number of ranks")
        if meta["step"] > self.num_iterations:
            raise SystemExit(f"error: checkpoint step {meta['step']} is past this run's {self.num_iterations} steps")
        self.model.load_state_dict(model_state)
        for opt, state in zip(self.optimizers, optim_states):
            opt.load_state_dict(state)
        self.step, self.loop = meta["step"], meta["loop_state"]
        _restore_rng(meta["rng"][self.rank], self.device)
        print0(f"resumed from {self.folder} at step {step}")
        return meta["data_state"][self.rank]

    def due(self, every, last):
        """Whether a periodic action (every N steps; 0 = only at the end; <0 = never) runs now."""
        return every >= 0 and (last or (every > 0 and self.step % every == 0))

    def save(self, data_state):
        if self.args.dry_run:
            return
        meta = {"step": self.step, "model_config": vars(self.model.config), "user_config": vars(self.args),
                "world_size": self.world_size, "loop_state": self.loop, "data_state": _gather(data_state),
                "rng": _gather(_rng_states(self.device))}
        save_checkpoint(self.folder, self.step, self.model, self.optimizers, meta, self.rank, keep=self.args.keep_checkpoints)
        print0(f"saved checkpoint at step {self.step} to {self.folder}")

    def fit(self, grad_accum, next_batch, loss_fn, evaluate, data_state, log_extra=lambda: ""):
        """Train until num_iterations (or a stop request), `grad_accum` micro-batches a step;
        returns the loop state."""
        args, muon = self.args, self.optimizers[-1]
        if args.run != "dummy" and self.rank == 0:
            import wandb

            self.wandb = wandb.init(project="nanochat", name=args.run, config=vars(args))
        stop, peak, start_step = StopRequest(), peak_flops(self.device), self.step
        flops_per_token = self.model.estimate_flops()
        while True:
            last = self.step >= self.num_iterations
            self.model.eval()
            with torch.no_grad():
                metrics = evaluate(self.step, last) or {}
            self.model.train()
            if metrics:
                self.wandb.log({"step": self.step, **metrics})
                for name, value in metrics.items():  # for the report's plots (once per step, also on resume)
                    points = self.loop.setdefault("curves", {}).setdefault(name, [])
                    if not points or points[-1][0] != self.step:
                        points.append([self.step, value])
            stopping = stop.check(self.device)
            if last or stopping or (args.save_every > 0 and self.step % args.save_every == 0 and self.step != start_step):
                self.save(data_state())
            if stopping:
                print0(f"stopped at step {self.step}; continue with the same command plus --resume=auto")
            if last or stopping:
                return self.loop

            t0 = time.time()
            step_loss = 0.0
            for _ in range(grad_accum):
                loss = loss_fn(self.train_model, next_batch()) / grad_accum
                loss.backward()
                step_loss = step_loss + loss.detach()
            lrm = lr_multiplier(self.step, self.num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
            for opt in self.optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lrm
            for group in muon.param_groups:
                group["momentum"] = muon_momentum(self.step, self.num_iterations, args.momentum_warmup, args.momentum_cooldown)
            grad_norm = step_optimizers(self.optimizers, args.grad_clip)
            self.model.zero_grad(set_to_none=True)
            train_loss = float(step_loss)  # the step's mean loss; synchronizes, so the step time below is real
            dt = time.time() - t0
            self.step += 1
            self._log(train_loss, lrm, grad_norm, dt, flops_per_token, peak, log_extra())

    def _log(self, train_loss, lrm, grad_norm, dt, flops_per_token, peak, extra):
        step, loop, beta = self.step, self.loop, 0.9
        loop["smooth_loss"] = beta * loop["smooth_loss"] + (1 - beta) * train_loss  # EMA, debiased below
        smooth = loop["smooth_loss"] / (1 - beta**step)
        if step > 10:  # the first steps include compilation and warmup
            loop["training_time"] += dt
        tokens = self.tokens_per_step() if callable(self.tokens_per_step) else self.tokens_per_step
        tok_per_sec = tokens / dt
        mfu = f"{100 * flops_per_token * tok_per_sec / (peak * self.world_size):.2f}%" if peak else "n/a"
        avg_dt = loop["training_time"] / (step - 10) if step > 10 else dt
        eta = (self.num_iterations - step) * avg_dt
        print0(f"step {step:05d}/{self.num_iterations:05d} ({100 * step / self.num_iterations:.2f}%) | loss: {smooth:.6f} | "
               f"lrm: {lrm:.2f} | grad norm: {grad_norm:.4f} | dt: {dt * 1000:.1f}ms | tok/sec: {tok_per_sec:,.0f} | "
               f"mfu: {mfu}{extra} | eta: {eta / 60:.1f}m")
        loop.setdefault("curves", {}).setdefault("train/loss", []).append([step, smooth])
        self.wandb.log({"step": step, "train/loss": smooth, "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_per_sec})

    def finish(self, section, results):
        """Log the stage's report section and close wandb."""
        if self.rank == 0 and not self.args.dry_run:
            report = get_report()
            report.log(section=section, data=[vars(self.args), {"steps": self.step, **results,
                                                                "training_time_min": self.loop["training_time"] / 60}])
            report.log_curves(section, self.loop.get("curves", {}))
        self.wandb.finish()
