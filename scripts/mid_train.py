"""
Midtraining: teach a base model the chat format, multiple-choice answers, the calculator tool
and spelling, on a mixture of conversations packed whole into rows, for one epoch. The learning
rate stays constant, then decays to 0 over the last --warmdown_ratio of the steps.

    python -m scripts.mid_train
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --device_batch_size=16
"""


import torch
import torch.distributed as dist

from nanochat.chat_batches import ConversationPacker, packed_batch
from nanochat.checkpoint_manager import find_model_tag, load_model
from nanochat.common import compute_cleanup, compute_init, int_flag, make_parser, print0, setup_default_logging
from nanochat.download import DownloadError
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_token_bytes
from nanochat.training import Trainer, add_common_flags, parse_args
from tasks.common import TaskMixture
from tasks.customjson import IDENTITY_CONVERSATIONS, CustomJSON
from tasks.gsm8k import GSM8K
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

parser = make_parser(description="Midtrain a base model on conversations.")
# base_train's schedule: -0.012 val bpb on the chat mixture over 60 steps, -0.040 over the epoch (dev/bench/RESULTS.md, "Midtraining's schedule")
add_common_flags(parser, device_batch_size=32, eval_every=150, source="base", warmdown_ratio=0.5, momentum_cooldown=0.5)
parser.add_argument("--max_seq_len", type=int_flag(1, -1), default=-1, help="row length (-1: the model's)")
parser.add_argument("--total_batch_size", type=int_flag(1), default=524288, help="tokens per optimizer step")
parser.add_argument("--eval_tokens", type=int_flag(1, -1), default=-1, help="val tokens per evaluation (-1: 20 x total_batch_size)")
parser.add_argument("--identity_file", default=IDENTITY_CONVERSATIONS, help="JSONL of conversations about the assistant itself")
parser.add_argument("--simple_spelling_size", type=int_flag(0), default=200_000, help="spelling examples in the mixture")
parser.add_argument("--spelling_bee_size", type=int_flag(0), default=80_000, help="letter-counting examples in the mixture")


def train_mixture(args):
    identity = CustomJSON(args.identity_file)
    return TaskMixture([SmolTalk("train"), MMLU("auxiliary_train", "train"), GSM8K("train"), identity, identity,
                        SimpleSpelling(args.simple_spelling_size, "train"), SpellingBee(args.spelling_bee_size, "train")])


def val_mixture():
    return TaskMixture([SmolTalk("test"), MMLU("all", "test", stop=5200), GSM8K("test", stop=420)])


def main():
    args = parse_args(parser)
    setup_default_logging()
    is_ddp, rank, _, world_size, device = compute_init(args.device_type)
    try:
        model_tag = args.model_tag or find_model_tag(args.source)
        model, tokenizer, _ = load_model(args.source, device, phase="train", model_tag=model_tag, step=args.source_step)
        token_bytes = get_token_bytes(device)
        train, val = train_mixture(args), val_mixture()
    except (FileNotFoundError, ValueError, DownloadError) as e:
        raise SystemExit(f"mid_train: {e}")
    T = args.max_seq_len if args.max_seq_len > 0 else model.config.sequence_len
    if args.total_batch_size % (T * world_size):
        raise SystemExit(f"error: --total_batch_size={args.total_batch_size} is not a multiple of max_seq_len x ranks = "
                         f"{T * world_size}; change one of them")
    step_rows = args.total_batch_size // (T * world_size)  # rows each rank trains on per step
    pad_id = tokenizer.get_bos_token_id()

    # One epoch: as many full steps as the rank with the fewest rows can make.
    rows = torch.tensor(ConversationPacker(train, tokenizer, T, rank, world_size).count_rows(), device=device)
    if is_ddp:
        dist.all_reduce(rows, op=dist.ReduceOp.MIN)
    epoch_steps = rows.item() // step_rows
    num_iterations = args.num_iterations if args.num_iterations > 0 else epoch_steps
    if num_iterations < 1:
        raise SystemExit(f"error: {len(train):,} conversations make {rows.item()} rows per rank: not one step of "
                         f"{step_rows} rows; lower --total_batch_size")
    trainer = Trainer(args, "mid", model, device, num_iterations, args.total_batch_size, model_tag)
    B = trainer.device_batch_size(T, allowed=lambda b: step_rows % b == 0)
    if step_rows % B:
        raise SystemExit(f"error: --device_batch_size={B} does not divide the {step_rows} rows each rank trains on per "
                         "step (--total_batch_size / (max_seq_len x ranks)); change one of them")
    grad_accum = step_rows // B
    print0(f"mixture: {len(train):,} conversations, {rows.item():,} rows per rank, {epoch_steps:,} steps per epoch; "
           f"training {num_iterations:,} steps, grad accumulation {grad_accum}")

    packer = ConversationPacker(train, tokenizer, T, rank, world_size, state=trainer.resume())
    trainer.loop.setdefault("min_val_bpb", None)

    def next_batch():
        nonlocal packer
        batch = packed_batch(packer, B, pad_id, device)
        if batch is None:  # more steps than one epoch were asked for: another epoch
            packer = ConversationPacker(train, tokenizer, T, rank, world_size)
            batch = packed_batch(packer, B, pad_id, device)
        return batch

    def val_batches():
        while True:  # as many passes over the val mixture as the evaluation needs
            val_packer, made = ConversationPacker(val, tokenizer, T, rank, world_size), 0
            while (batch := packed_batch(val_packer, B, pad_id, device)) is not None:
                made += 1
                yield batch
            if not made:
                raise SystemExit(f"error: the val mixture has too few conversations for one batch of {B} rows per rank")

    eval_steps = max(1, (args.eval_tokens if args.eval_tokens > 0 else 20 * args.total_batch_size) // (B * T * world_size))

    def evaluate(step, last):
        if not trainer.due(args.eval_every, last):
            return {}
        bpb = evaluate_bpb(model, val_batches(), eval_steps, token_bytes)
        loop = trainer.loop
        loop["val_bpb"], loop["min_val_bpb"] = bpb, min(bpb, loop["min_val_bpb"] or bpb)
        print0(f"step {step:05d} | val bpb: {bpb:.6f}")
        return {"val/bpb": bpb}

    loop = trainer.fit(grad_accum, next_batch, lambda m, batch: m(*batch), evaluate, lambda: packer.state())
    trainer.finish("Midtraining", {"conversations": len(train), "min_val_bpb": loop["min_val_bpb"], "final_val_bpb": loop.get("val_bpb")})
    compute_cleanup()


if __name__ == "__main__":
    main()
