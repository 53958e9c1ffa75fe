"""
Pretrain the GPT on FineWeb-Edu.

    python -m scripts.base_train --depth=4 --max_seq_len=256 --device_batch_size=8 --total_batch_size=4096
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20
"""

import math
import time

import torch

from nanochat.common import compute_cleanup, compute_init, float_flag, int_flag, make_parser, print0, setup_default_logging
from nanochat.core_eval import eval_bundle_dir, evaluate_core
from nanochat.dataloader import PACKINGS, cropped_fraction, tokenizing_distributed_data_loader
from nanochat.download import DownloadError
from nanochat.fp8 import supported as fp8_supported
from nanochat.gpt import GPT, RECIPE, config_for_depth
from nanochat.loss_eval import EVAL_LOADER_KWARGS, evaluate_bpb
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training import Trainer, add_common_flags, parse_args

parser = make_parser(description="Pretrain the GPT.")
add_common_flags(parser, device_batch_size=32, eval_every=250, warmdown_ratio=0.5, momentum_cooldown=0.5)  # dev/bench/recipe.py
parser.add_argument("--depth", type=int_flag(1), default=20, help="layers; width = 64 * depth")
parser.add_argument("--max_seq_len", type=int_flag(1), default=2048, help="context length of training rows, in tokens")
parser.add_argument("--seed", type=int, default=42, help="initial weights' seed (the data order is fixed)")
m = parser.add_argument_group("model options (default: the recipe's, nanochat.gpt.RECIPE)")
m.add_argument("--head_dim", type=int_flag(1), default=128, help="attention head size (heads = width / head_dim)")
m.add_argument("--value_embeds", type=int, choices=[0, 1], default=None, help="gated value embeddings on every other layer")
m.add_argument("--residual_scalars", type=int, choices=[0, 1], default=None, help="learned per-layer residual and input-skip weights")
m.add_argument("--softcap", type=float_flag(0), default=None, help="logit soft cap")
m.add_argument("--rotary_base", type=float_flag(1), default=None, help="rotary embedding base")
m.add_argument("--window", type=float_flag(0, 1), default=None, help="sliding attention window of three layers in four, a fraction of max_seq_len (0 = off)")
m.add_argument("--window_stages", type=int_flag(1), default=1,
               help="the window grows over the run: --window / 2^(stages - 1) at first, doubling at even intervals (1 = --window throughout)")
m.add_argument("--attn_scale", type=float_flag(0), default=None, help="scale of the attention scores (0 = 1/sqrt(head_dim))")
m.add_argument("--attn_gate", type=int, choices=[0, 1], default=None, help="a learned gate per head on attention's output")
m.add_argument("--smear", type=int, choices=[0, 1], default=None, help="mix a gated share of the previous token's embedding into each token's")
m.add_argument("--key_offset", type=int, choices=[0, 1], default=None, help="full-context layers' keys read half their dims a token back")
m.add_argument("--canon", type=int, choices=[0, 1], default=None, help="Canon layers: a causal depthwise conv of width 4 on attention's and the MLP's inputs")
m.add_argument("--tie_embedding", type=int, choices=[0, 1], default=None, help="1 = the lm_head's rows are the token embedding too (AdamW at the unembedding LR)")
m.add_argument("--doc_mask", type=int, choices=[0, 1], default=0, help="1 = attention, smear, key offset and Canon layers stay inside each document (BOS to BOS)")
MODEL_OPTIONS = ("value_embeds", "residual_scalars", "softcap", "rotary_base", "window", "attn_scale", "attn_gate", "smear", "key_offset", "canon", "tie_embedding")
parser.add_argument("--init_scale", type=float_flag(0), default=1.0, help="initial std of the blocks' input matrices, times 1/sqrt(width)")
parser.add_argument("--fp8", type=int, choices=[0, 1], default=0, help="1 = the blocks' training matmuls in float8 (GPUs with compute capability 8.9+)")
parser.add_argument("--packing", choices=PACKINGS, default="bestfit", help="how documents fill training rows (nanochat.dataloader)")
parser.add_argument("--total_batch_size", type=int_flag(1, -1), default=-1,
                    help="tokens per optimizer step (-1: by the batch rule, see batch_rule; 524288 at depth 20)")
# horizon when --num_iterations is not set: the first of these that is set
parser.add_argument("--target_flops", type=float, default=-1.0, help="training FLOPs budget")
parser.add_argument("--target_param_data_ratio", type=float, default=20, help="tokens per parameter, value embeddings not counted (Chinchilla: 20)")
parser.add_argument("--eval_tokens", type=int_flag(1, -1), default=-1, help="val tokens per evaluation (-1: 20 x total_batch_size)")
parser.add_argument("--eval_doc_starts", type=int, choices=[0, 1], default=0,
                    help="1 = at the end, also score val rows packed best-fit (mostly each document's first tokens)")
parser.add_argument("--core_metric_every", type=int_flag(-1), default=2000, help="CORE every N steps (-1 = never; the full one is scripts.base_eval)")
parser.add_argument("--core_metric_max_per_task", type=int_flag(1, -1), default=500, help="items per CORE task during training")
parser.add_argument("--sample_every", type=int_flag(-1), default=2000, help="greedy samples every N steps (0 = only at the end)")

SAMPLE_PROMPTS = [
    "The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is", "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is",
]


# The batch rule, for --total_batch_size=-1: the speedrun's 2^19 tokens per step at depth 20,
# scaled with the model as the compute-optimal batch scales with the training tokens, B ~ D^0.383
# (Bergsma et al. 2025, "Power Lines"); at a fixed tokens-per-parameter horizon D ~ N. The LRs
# follow the batch as sqrt(B / 2^19), as Adam-type updates want (dev/bench/recipe.py's batch rows).
REFERENCE_DEPTH, REFERENCE_BATCH = 20, 2**19


def horizon_params(model):
    """The parameters the horizon counts: all but the value-embedding tables, lookups as large as
    the rest of the model at depth 20, which would otherwise more than double the run."""
    return model.num_params() - sum(table.weight.numel() for table in model.value_embeds.values())


def batch_rule(config, params):
    """(tokens per step, LR scale) for a model of `params` horizon parameters."""
    options = {k: getattr(config, k) for k in RECIPE}  # the reference has this model's options
    with torch.device("meta"):
        reference = GPT(config_for_depth(REFERENCE_DEPTH, config.vocab_size, config.sequence_len, **options))
    batch = 2 ** round(math.log2(REFERENCE_BATCH * (params / horizon_params(reference)) ** 0.383))
    return batch, math.sqrt(batch / REFERENCE_BATCH)


def window_schedule(step, num_iterations, window, stages):
    """The short layers' window (a fraction of the context) at a step: window / 2^(stages - 1) over the
    first 1/stages of the run, doubling at each further 1/stages, so that the last trains at `window`,
    the one the model keeps (after modded-nanogpt, whose windows grow over training: in
    dev/bench/recipe.py a shorter window learns faster early on, a longer one is better later)."""
    stage = min(stages - 1, step * stages // num_iterations)
    return window / 2 ** (stages - 1 - stage)


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
    _, rank, _, world_size, device = compute_init(args.device_type, seed=args.seed)
    if args.fp8 and not fp8_supported(device):
        raise SystemExit(f"error: --fp8=1 needs a CUDA GPU with float8 matmuls (compute capability 8.9+), not {device}; drop --fp8")
    try:
        tokenizer = get_tokenizer()
        token_bytes = get_token_bytes(device)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}")
    options = {k: type(RECIPE[k])(getattr(args, k)) for k in MODEL_OPTIONS if getattr(args, k) is not None}
    options["doc_token"] = tokenizer.get_bos_token_id() if args.doc_mask else -1
    config = config_for_depth(args.depth, tokenizer.get_vocab_size(), args.max_seq_len, args.head_dim, **options)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights(args.init_scale)
    if args.fp8:
        model.use_fp8()
    num_params, flops_per_token, counted = model.num_params(), model.estimate_flops(), horizon_params(model)
    if args.total_batch_size == -1:
        args.total_batch_size, lr_scale = batch_rule(config, counted)
        for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr"):
            setattr(args, name, getattr(args, name) * lr_scale)
        print0(f"batch rule: {args.total_batch_size:,} tokens per step, LRs x {lr_scale:.3f}")
    num_iterations = horizon(args, counted, flops_per_token)

    # Batch: sequences per rank per micro-step, micro-steps per optimizer step
    trainer = Trainer(args, "base", model, device, num_iterations, args.total_batch_size, f"d{args.depth}")
    T = args.max_seq_len
    B = trainer.device_batch_size(T, allowed=lambda b: args.total_batch_size % (b * T * world_size) == 0)
    if args.total_batch_size % (B * T * world_size):
        raise SystemExit(f"error: --total_batch_size={args.total_batch_size} is not a multiple of device_batch_size x "
                         f"max_seq_len x ranks = {B * T * world_size}; change one of them")
    grad_accum = args.total_batch_size // (B * T * world_size)
    print0(f"model: {config}")
    print0(f"parameters: {num_params:,} | FLOPs/token: {flops_per_token:.3e} | steps: {num_iterations:,} | "
           f"tokens: {num_iterations * args.total_batch_size:,} ({num_iterations * args.total_batch_size / counted:.1f}/param "
           f"without value embeddings) | "
           f"grad accumulation: {grad_accum} | total FLOPs: {flops_per_token * args.total_batch_size * num_iterations:.3e}")
    loader_state = trainer.resume()
    trainer.loop.setdefault("val_bpb", None)
    trainer.loop.setdefault("min_val_bpb", None)
    eval_tokens = args.eval_tokens if args.eval_tokens > 0 else 20 * args.total_batch_size
    try:
        train_loader = tokenizing_distributed_data_loader(tokenizer, B, T, "train", device, resume_state=loader_state,
                                                          packing=args.packing)
        tokenizing_distributed_data_loader(tokenizer, B, T, "val", device)  # fail now, not at the first eval
        if 0 < args.core_metric_every <= num_iterations:
            eval_bundle_dir()
    except (FileNotFoundError, ValueError, DownloadError) as e:
        raise SystemExit(f"error: {e}")

    def next_batch():
        nonlocal loader_state
        x, y, loader_state = next(train_loader)
        return x, y

    def evaluate(step, last):
        metrics, loop = {}, trainer.loop
        if trainer.due(args.eval_every, last):
            val_loader = tokenizing_distributed_data_loader(tokenizer, B, T, "val", device, **EVAL_LOADER_KWARGS)
            bpb = evaluate_bpb(model, val_loader, max(1, eval_tokens // (B * T * world_size)), token_bytes)
            loop["val_bpb"], loop["min_val_bpb"] = bpb, min(bpb, loop["min_val_bpb"] or bpb)
            print0(f"step {step:05d} | val bpb: {bpb:.6f}")
            metrics["val/bpb"] = bpb
        if last and args.eval_doc_starts:  # what a packing does to the start of documents, which prompts resemble
            starts = tokenizing_distributed_data_loader(tokenizer, B, T, "val", device, buffer_docs=128, tokenizer_batch=128)
            bpb = evaluate_bpb(model, starts, max(1, eval_tokens // (B * T * world_size)), token_bytes)
            print0(f"step {step:05d} | val bpb at document starts: {bpb:.6f}")
        if args.core_metric_every > 0 and step > 0 and step % args.core_metric_every == 0:
            core = evaluate_core(model, tokenizer, device, args.core_metric_max_per_task, rank, world_size)["core"]
            loop["core_metric"] = metrics["core_metric"] = core
            print0(f"step {step:05d} | CORE: {core:.4f}")
        if rank == 0 and trainer.due(args.sample_every, last) and step > 0:
            for prompt in SAMPLE_PROMPTS:
                ids = tokenizer.encode(prompt, prepend="<|bos|>")
                print0("sample: " + prompt + tokenizer.decode(list(model.generate(ids, 16, temperature=0))))
        return metrics

    def loss(m, batch):
        model.set_window(window_schedule(trainer.step, num_iterations, config.window, args.window_stages))
        return m(*batch)

    t_start = time.time()
    loop = trainer.fit(grad_accum, next_batch, loss, evaluate, lambda: loader_state,
                       log_extra=lambda: f" | cropped: {100 * cropped_fraction(loader_state):.1f}%")
    print0(f"done: {trainer.step} steps, min val bpb {loop['min_val_bpb']}, {(time.time() - t_start) / 60:.2f} min wall")
    trainer.finish("Base model training", {
        "parameters": num_params, "flops_per_token": flops_per_token, "tokens": trainer.step * args.total_batch_size,
        "min_val_bpb": loop["min_val_bpb"], "final_val_bpb": loop["val_bpb"], "core_metric": loop.get("core_metric")})
    compute_cleanup()


if __name__ == "__main__":
    main()
