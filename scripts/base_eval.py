"""
CORE metric of a model (see nanochat/core_eval.py): a table per task, a CSV and a report section.

    python -m scripts.base_eval --max_per_task=100          # quick: 100 items per task
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval
"""

import csv
import os

from nanochat.checkpoint_manager import find_model_tag, load_model
from nanochat.common import compute_cleanup, compute_init, get_base_dir, int_flag, make_parser, print0, setup_default_logging
from nanochat.core_eval import evaluate_core
from nanochat.download import DownloadError
from nanochat.report import get_report
from nanochat.training import parse_args

parser = make_parser(description="Evaluate the CORE metric.")
parser.add_argument("-i", "--source", choices=["base", "mid", "sft", "rl"], default="base", help="the stage whose model to evaluate")
parser.add_argument("-g", "--model_tag", default=None, help="default: the newest of the source")
parser.add_argument("-s", "--step", type=int, default=None, help="default: the last saved step")
parser.add_argument("--max_per_task", type=int_flag(1, -1), default=-1, help="items per task (-1 = all)")
parser.add_argument("--device_type", default=None, help="cuda|mps|cpu (default: autodetect)")


def write_csv(results, path):
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "items", "accuracy", "centered"])
        for label, r in results["tasks"].items():
            w.writerow([label, r["items"], f"{r['accuracy']:.6f}", f"{r['centered']:.6f}"])
        w.writerow(["CORE", "", "", f"{results['core']:.6f}"])
    os.replace(tmp, path)


def main():
    args = parse_args(parser)
    setup_default_logging()
    _, rank, _, world_size, device = compute_init(args.device_type)
    try:
        model_tag = args.model_tag or find_model_tag(args.source)
        model, tokenizer, meta = load_model(args.source, device, model_tag=model_tag, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"base_eval: {e}")
    try:
        results = evaluate_core(model, tokenizer, device, args.max_per_task, rank, world_size)
    except DownloadError as e:
        raise SystemExit(f"base_eval: cannot fetch the eval bundle: {e}")

    print0(f"{'task':<36} {'items':>6} {'accuracy':>9} {'centered':>9}")
    for label, r in results["tasks"].items():
        print0(f"{label:<36} {r['items']:>6} {r['accuracy']:>9.4f} {r['centered']:>9.4f}")
    print0(f"{'CORE':<36} {'':>6} {'':>9} {results['core']:>9.4f}")
    if rank == 0:
        folder = os.path.join(get_base_dir(), "base_eval")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{args.source}_{model_tag}_{meta['step']:06d}.csv")
        write_csv(results, path)
        print0(f"wrote {path}")
        get_report().log("Base model evaluation", [
            {"source": args.source, "model": model_tag, "step": meta["step"], "max_per_task": args.max_per_task},
            {"CORE": results["core"]},
            {label: r["centered"] for label, r in results["tasks"].items()},
        ])
    compute_cleanup()


if __name__ == "__main__":
    main()
