"""
Bits per byte of a base model on the train and val splits, plus a few greedy samples.

    python -m scripts.base_loss [--split_tokens=10485760] [--model_tag=d20] [--step=N]
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss
"""


from nanochat.checkpoint_manager import load_model
from nanochat.common import compute_cleanup, compute_init, int_flag, make_parser, print0, setup_default_logging
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.loss_eval import EVAL_LOADER_KWARGS, evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes
from nanochat.training import parse_args

parser = make_parser(description="Evaluate a base model's bits per byte.")
parser.add_argument("--device_type", default=None, help="cuda|mps|cpu (default: autodetect)")
parser.add_argument("--device_batch_size", type=int_flag(1), default=8, help="sequences per rank per forward (the tokens evaluated do not depend on it)")
parser.add_argument("--split_tokens", type=int_flag(1, -1), default=-1, help="tokens per split (-1: the --eval_tokens training used)")
parser.add_argument("--model_tag", default=None, help="default: the newest base model")
parser.add_argument("--step", type=int, default=None, help="default: the last saved step")

PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "The opposite of hot is", "If 5*x + 3 = 13, then x is"]


def main():
    args = parse_args(parser)
    setup_default_logging()
    is_ddp, rank, _, world_size, device = compute_init(args.device_type)
    try:
        model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.step)
        token_bytes = get_token_bytes(device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    B, T = args.device_batch_size, model.config.sequence_len
    trained = meta["user_config"]
    split_tokens = args.split_tokens if args.split_tokens > 0 else trained["eval_tokens"] if trained["eval_tokens"] > 0 else 20 * trained["total_batch_size"]
    steps = max(1, split_tokens // (B * T * world_size))
    results = {}
    for split in ("train", "val"):
        try:
            loader = tokenizing_distributed_data_loader(tokenizer, B, T, split, device, **EVAL_LOADER_KWARGS)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}")
        results[f"{split}_bpb"] = evaluate_bpb(model, loader, steps, token_bytes)
        print0(f"{split} bpb: {results[split + '_bpb']:.6f}")
    samples = []
    if rank == 0:
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt, prepend="<|bos|>")
            samples.append(prompt + tokenizer.decode(list(model.generate(ids, 16, temperature=0))))
            print0("sample: " + samples[-1])
    get_report().log(section="Base model loss", data=[{"step": meta["step"], **results, "split_tokens": split_tokens}, *samples])
    compute_cleanup()


if __name__ == "__main__":
    main()
