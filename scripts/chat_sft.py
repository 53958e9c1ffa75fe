"""
Supervised finetuning: conversations one per row, loss only on what the assistant says, for one
epoch with the learning rate falling linearly to 0. Starts from the midtrained model (-i base to
skip midtraining). Every --eval_every steps: val loss, MMLU and ARC-Easy accuracy.

    python -m scripts.chat_sft
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft
"""


import torch
import torch.distributed as dist

from nanochat.chat_batches import sft_batch
from nanochat.checkpoint_manager import find_model_tag, load_model
from nanochat.common import compute_cleanup, compute_init, int_flag, make_parser, print0, setup_default_logging
from nanochat.download import DownloadError
from nanochat.engine import Engine
from nanochat.training import Trainer, add_common_flags, parse_args
from scripts.chat_eval import task_accuracy
from tasks.arc import ARC
from tasks.common import TaskMixture
from tasks.customjson import IDENTITY_CONVERSATIONS, CustomJSON
from tasks.gsm8k import GSM8K
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

parser = make_parser(description="Finetune a chat model on conversations.")
add_common_flags(parser, device_batch_size=4, eval_every=100, source="mid", init_lr_frac=0.02, warmdown_ratio=1.0)
parser.add_argument("--examples_per_step", type=int_flag(1), default=32, help="conversations per optimizer step (all ranks)")
parser.add_argument("--max_seq_len", type=int_flag(1, -1), default=-1, help="longest row (-1: the model's)")
parser.add_argument("--eval_conversations", type=int_flag(1), default=256, help="SmolTalk test conversations for the val loss")
parser.add_argument("--eval_max_problems", type=int_flag(1), default=1024, help="MMLU / ARC-Easy questions per evaluation")
parser.add_argument("--identity_file", default=IDENTITY_CONVERSATIONS, help="JSON-lines conversations that teach the model who it is")
parser.add_argument("--smoltalk_size", type=int_flag(0), default=10_000, help="SmolTalk conversations in the mixture")
parser.add_argument("--exclude", default="", help="comma-separated parts of the mixture to leave out (e.g. ARC-Challenge)")

PARTS = {
    "ARC-Easy": lambda a: ARC("ARC-Easy", "train"),
    "ARC-Challenge": lambda a: ARC("ARC-Challenge", "train"),
    "GSM8K": lambda a: GSM8K("train"),
    "SmolTalk": lambda a: SmolTalk("train", stop=a.smoltalk_size),
    "identity": lambda a: CustomJSON(a.identity_file),
    "SimpleSpelling": lambda a: SimpleSpelling(300, "train"),
    "SpellingBee": lambda a: SpellingBee(300, "train"),
}


def main():
    args = parse_args(parser)
    setup_default_logging()
    excluded = {p for p in args.exclude.split(",") if p}
    if unknown := excluded - set(PARTS):
        parser.error(f"--exclude: unknown part(s) {sorted(unknown)}; the parts are {', '.join(PARTS)}")
    is_ddp, rank, _, world_size, device = compute_init(args.device_type)
    try:
        model_tag = args.model_tag or find_model_tag(args.source)
        model, tokenizer, _ = load_model(args.source, device, phase="train", model_tag=model_tag, step=args.source_step)
        train = TaskMixture([make(args) for name, make in PARTS.items() if name not in excluded])
        val, mmlu, arc = SmolTalk("test", stop=args.eval_conversations), MMLU("all", "test"), ARC("ARC-Easy", "test")
    except (FileNotFoundError, ValueError, DownloadError) as e:
        raise SystemExit(f"chat_sft: {e}")
    T = args.max_seq_len if args.max_seq_len > 0 else model.config.sequence_len
    epoch_steps = len(train) // args.examples_per_step
    num_iterations = args.num_iterations if args.num_iterations > 0 else epoch_steps
    if num_iterations < 1:
        raise SystemExit(f"error: {len(train)} conversations are not one step of --examples_per_step={args.examples_per_step}")
    trainer = Trainer(args, "sft", model, device, num_iterations, args.examples_per_step * T, model_tag, fixed_shapes=False)
    B = trainer.device_batch_size(T, allowed=lambda b: args.examples_per_step % (b * world_size) == 0)
    if args.examples_per_step % (B * world_size):
        raise SystemExit(f"error: --examples_per_step={args.examples_per_step} is not a multiple of "
                         f"device_batch_size x ranks = {B * world_size}")
    grad_accum = args.examples_per_step // (B * world_size)
    print0(f"mixture: {len(train):,} conversations, {epoch_steps:,} steps per epoch; training {num_iterations:,} steps, "
           f"grad accumulation {grad_accum}")

    mine = range(rank, len(train), world_size)  # this rank's conversations, in mixture order
    cursor = trainer.resume() or 0
    pad_id = tokenizer.get_bos_token_id()

    def next_batch():
        nonlocal cursor
        if cursor + B > len(mine):
            cursor = 0  # the next epoch
        batch = [train[i] for i in mine[cursor : cursor + B]]
        cursor += B
        return sft_batch(batch, tokenizer, T, pad_id, device)

    engine = Engine(model, tokenizer)

    def evaluate(step, last):
        if not trainer.due(args.eval_every, last):
            return {}
        losses = [model(*sft_batch([val[i] for i in range(r, min(r + B, len(val)))], tokenizer, T, pad_id, device))
                  for r in range(rank * B, len(val), B * world_size)]
        total = torch.tensor([sum(loss.item() for loss in losses), len(losses)], dtype=torch.float64, device=device)
        if is_ddp:
            dist.all_reduce(total)  # ranks may hold different numbers of val batches
        metrics = {"val/loss": (total[0] / total[1].clamp(min=1)).item()}
        for name, task in (("mmlu_acc", mmlu), ("arc_easy_acc", arc)):
            metrics[name] = task_accuracy(task, engine, device, B, max_problems=args.eval_max_problems, rank=rank,
                                          world_size=world_size)[0]
        trainer.loop.update(metrics)
        print0(f"step {step:05d} | " + " | ".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
        return metrics

    trainer.fit(grad_accum, next_batch, lambda m, batch: m(*batch), evaluate, lambda: cursor)
    trainer.finish("Chat SFT", {"conversations": len(train), **{k: trainer.loop.get(k) for k in ("val/loss", "mmlu_acc", "arc_easy_acc")}})
    compute_cleanup()


if __name__ == "__main__":
    main()
