"""
Evaluate a chat model on ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval and SpellingBee, and
their ChatCORE: the mean accuracy centered on each task's chance level (0.25 for the four-way
multiple-choice tasks, 0 for the generative ones), reported when all six ran.

    python -m scripts.chat_eval -i sft                        # every task
    python -m scripts.chat_eval -i mid -a "ARC-Easy|GSM8K" -x 100
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft

Multiple-choice (categorical) tasks: one batched forward per batch of questions, the answer is
the letter whose token scores highest at the answer's position (only the answer letters compete).
Generative tasks: -n samples per problem from the Engine (calculator tool on); a problem counts
as solved if any sample is correct.
"""


import torch
import torch.distributed as dist

from nanochat.chat import sample_replies
from nanochat.checkpoint_manager import load_model
from nanochat.common import compute_cleanup, compute_init, float_flag, int_flag, make_parser, print0, setup_default_logging
from nanochat.download import DownloadError
from nanochat.engine import Engine
from nanochat.report import get_report
from nanochat.training import parse_args
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spellingbee import SpellingBee

TASKS = {
    "ARC-Easy": (lambda: ARC("ARC-Easy", "test"), 0.25),
    "ARC-Challenge": (lambda: ARC("ARC-Challenge", "test"), 0.25),
    "MMLU": (lambda: MMLU("all", "test"), 0.25),
    "GSM8K": (lambda: GSM8K("test"), 0.0),
    "HumanEval": (lambda: HumanEval(), 0.0),
    "SpellingBee": (lambda: SpellingBee(size=256, split="test"), 0.0),
}

parser = make_parser(description="Evaluate a chat model on the chat tasks.")
parser.add_argument("-i", "--source", choices=["base", "mid", "sft", "rl"], default="sft", help="the stage whose model to evaluate")
parser.add_argument("-a", "--task_name", default=None, help=f"'|'-separated, from {'|'.join(TASKS)} (default: all)")
parser.add_argument("-t", "--temperature", type=float_flag(0), default=0.0, help="sampling temperature of generative tasks (0 = greedy)")
parser.add_argument("-m", "--max_new_tokens", type=int_flag(1), default=512, help="longest answer of generative tasks, in tokens")
parser.add_argument("-n", "--num_samples", type=int_flag(1), default=1, help="answers per problem (pass@n)")
parser.add_argument("-k", "--top_k", type=int_flag(1), default=50, help="sample among the k most likely tokens")
parser.add_argument("-b", "--batch_size", type=int_flag(1), default=8, help="questions per forward (categorical tasks)")
parser.add_argument("--sample_batch_size", type=int_flag(1), default=256, help="rows sampled at once, problems x samples (generative tasks)")
parser.add_argument("-g", "--model_tag", default=None, help="checkpoint folder (default: the largest model of the stage)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("-x", "--max_problems", type=int_flag(1), default=None, help="evaluate at most this many problems per task")
parser.add_argument("--device_type", default=None, help="cuda|mps|cpu (default: autodetect)")


@torch.no_grad()
def run_categorical(model, tokenizer, task, indices, batch_size, device):
    """Correct answers among task[i] for i in indices."""
    correct = 0
    for b in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[b : b + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        width = max(len(p) for p in prompts)
        batch = torch.full((len(prompts), width), tokenizer.get_bos_token_id(), dtype=torch.long)
        for r, p in enumerate(prompts):
            batch[r, : len(p)] = torch.tensor(p)
        logits = model(batch.to(device))
        for r, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letter_ids = [letter_token(tokenizer, letter) for letter in conversation["letters"]]
            scores = logits[r, len(prompt) - 1, letter_ids]
            correct += task.evaluate(conversation, conversation["letters"][scores.argmax().item()])
    return correct


def letter_token(tokenizer, letter):
    ids = tokenizer.encode(letter)
    if len(ids) != 1:
        raise ValueError(f"answer letter {letter!r} is {len(ids)} tokens for this tokenizer; expected 1")
    return ids[0]


def run_generative(engine, task, indices, args):
    """Problems among task[i] for i in indices that at least one of num_samples answers solves,
    sampled --sample_batch_size rows (problems x samples) at a time."""
    conversations = [task[i] for i in indices]
    replies = sample_replies(engine, conversations, args.num_samples, args.max_new_tokens, args.temperature, args.top_k,
                             seed=indices[0] if indices else 0, batch_rows=args.sample_batch_size)
    # (no replies: the question fills the context)
    return sum(any(task.evaluate(c, text) for text in texts) for c, (_, _, texts) in zip(conversations, replies))


def task_accuracy(task, engine, device, batch_size, args=None, max_problems=None, rank=0, world_size=1):
    """Accuracy on the first max_problems of `task`, each rank taking every world_size-th problem.
    Categorical tasks run in batches of batch_size; generative ones sample as `args` says."""
    total = len(task) if max_problems is None else min(len(task), max_problems)
    indices = list(range(rank, total, world_size))
    if task.eval_type == "categorical":
        correct = run_categorical(engine.model, engine.tokenizer, task, indices, batch_size, device)
    else:
        correct = run_generative(engine, task, indices, args)
    count = torch.tensor(correct, dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(count)
    return count.item() / total, int(count.item()), total


def main():
    args = parse_args(parser)
    setup_default_logging()
    names = args.task_name.split("|") if args.task_name else list(TASKS)
    if unknown := [n for n in names if n not in TASKS]:
        parser.error(f"unknown task(s) {unknown}; choose from {'|'.join(TASKS)}")
    _, rank, _, world_size, device = compute_init(args.device_type)
    try:
        model, tokenizer, meta = load_model(args.source, device, model_tag=args.model_tag, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"chat_eval: {e}")
    engine = Engine(model, tokenizer)

    accuracies = {}
    for name in names:
        try:
            task = TASKS[name][0]()
        except DownloadError as e:
            raise SystemExit(f"chat_eval: cannot fetch {name}: {e}")
        accuracies[name], correct, total = task_accuracy(task, engine, device, args.batch_size, args, args.max_problems,
                                                         rank, world_size)
        print0(f"{name}: {correct}/{total} = {100 * accuracies[name]:.2f}%")

    report = [{"source": args.source, "step": meta["step"], "max_problems": args.max_problems}, accuracies]
    if len(accuracies) == len(TASKS):
        centered = [(accuracies[n] - TASKS[n][1]) / (1 - TASKS[n][1]) for n in TASKS]
        chatcore = sum(centered) / len(centered)
        print0(f"ChatCORE: {chatcore:.4f}")
        report.append({"ChatCORE": chatcore})
    if rank == 0:
        get_report().log(f"Chat evaluation {args.source}", report)
    compute_cleanup()


if __name__ == "__main__":
    main()
