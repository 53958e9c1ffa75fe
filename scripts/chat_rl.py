"""
Reinforcement learning on GSM8K: for each training problem the model samples --num_samples
answers (calculator tool on); an answer's reward is 1 if its final number is right; its
advantage is the reward minus the mean reward of its problem's samples. The loss is the
policy gradient -advantage * log p(token), summed over the tokens the model sampled (the prompt
and the tool outputs forced into the answer do not count) and divided by their number.
Every --eval_every steps: pass@1 and pass@k on GSM8K test.

    python -m scripts.chat_rl
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl
"""

from collections import deque

import torch
import torch.distributed as dist

from nanochat.chat import sample_replies
from nanochat.chat_batches import masked_rows
from nanochat.checkpoint_manager import find_model_tag, load_model
from nanochat.common import compute_cleanup, compute_init, float_flag, int_flag, make_parser, print0, setup_default_logging
from nanochat.download import DownloadError
from nanochat.engine import Engine
from nanochat.training import Trainer, add_common_flags, parse_args
from tasks.gsm8k import GSM8K

parser = make_parser(description="Improve a chat model on GSM8K by reinforcement learning.")
add_common_flags(parser, device_batch_size=8, eval_every=60, source="sft", init_lr_frac=0.05, warmdown_ratio=1.0)
parser.add_argument("--examples_per_step", type=int_flag(1), default=16, help="problems per step (all ranks)")
parser.add_argument("--num_samples", type=int_flag(1), default=16, help="answers sampled per problem")
parser.add_argument("--max_new_tokens", type=int_flag(1), default=256, help="longest sampled answer, in tokens")
parser.add_argument("--temperature", type=float_flag(0), default=1.0, help="sampling temperature of the rollouts")
parser.add_argument("--top_k", type=int_flag(1), default=50, help="sample among the k most likely tokens")
parser.add_argument("--eval_examples", type=int_flag(1), default=400, help="GSM8K test problems per evaluation")
parser.add_argument("--eval_k", type=int_flag(1), default=4, help="samples per problem for pass@k")
parser.add_argument("--rollout_batch_size", type=int_flag(1, -1), default=-1,
                    help="rows (problems x samples) the engine samples at once (-1: a rank's rows of one step)")


def rollout_batches(engine, task, indices, args, batch_size, rollout_rows, seed):
    """Sample answers to task[i] for i in indices, rollout_rows rows at a time; returns
    (micro-batches of batch_size rows of (inputs, targets, advantages), rewards). Targets are -1
    where nothing was sampled: prompt, tool output, padding."""
    rows, rewards = [], []
    conversations = [task[i] for i in indices]
    sampled = sample_replies(engine, conversations, args.num_samples, args.max_new_tokens, args.temperature, args.top_k,
                             seed, batch_rows=rollout_rows)
    for conversation, (sequences, masks, replies) in zip(conversations, sampled):
        if not replies:  # the prompt fills the context
            continue
        scores = [task.reward(conversation, reply) for reply in replies]
        mean = sum(scores) / len(scores)
        rows += [(s, m, r - mean) for s, m, r in zip(sequences, masks, scores)]
        rewards += scores
    batches = []
    for b in range(0, len(rows), batch_size):
        chunk = rows[b : b + batch_size]
        x, y = masked_rows([(s, m) for s, m, _ in chunk], engine.tokenizer.get_bos_token_id())
        batches.append((x, y, torch.tensor([a for _, _, a in chunk], dtype=torch.float32)))
    return batches, rewards


def empty_batch(pad_id):
    """A micro-batch with nothing to learn: stands in for problems whose prompt filled the context."""
    return torch.full((1, 1), pad_id, dtype=torch.long), torch.full((1, 1), -1, dtype=torch.long), torch.zeros(1)


def policy_gradient_loss(model, x, y, advantages, num_tokens):
    """-sum(advantage * log p(sampled token)) / num_tokens over this micro-batch's sampled tokens."""
    logp = -model(x, y, loss_reduction="none").view(y.shape)  # 0 where y is -1
    return -(logp * advantages[:, None]).sum() / num_tokens


@torch.no_grad()
def pass_at_k(engine, task, args, rollout_rows, device, rank, world_size):
    """(pass@1, pass@k) on the first --eval_examples problems, k = --eval_k samples each."""
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # sum of per-problem pass@1, solved, problems
    conversations = [task[i] for i in range(rank, min(args.eval_examples, len(task)), world_size)]
    sampled = sample_replies(engine, conversations, args.eval_k, args.max_new_tokens, args.temperature, args.top_k,
                             seed=rank, batch_rows=rollout_rows)
    for conversation, (_, _, replies) in zip(conversations, sampled):
        correct = [task.evaluate(conversation, reply) for reply in replies] or [0]  # none: the prompt fills the context
        counts += torch.tensor([sum(correct) / len(correct), any(correct), 1], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(counts)
    return (counts[0] / counts[2]).item(), (counts[1] / counts[2]).item()


def main():
    args = parse_args(parser)
    setup_default_logging()
    _, rank, _, world_size, device = compute_init(args.device_type)
    if args.examples_per_step % world_size:
        raise SystemExit(f"error: --examples_per_step={args.examples_per_step} must split evenly over {world_size} ranks")
    try:
        model_tag = args.model_tag or find_model_tag(args.source)
        model, tokenizer, _ = load_model(args.source, device, phase="train", model_tag=model_tag, step=args.source_step)
        train, test = GSM8K("train"), GSM8K("test")
    except (FileNotFoundError, ValueError, DownloadError) as e:
        raise SystemExit(f"chat_rl: {e}")
    num_iterations = args.num_iterations if args.num_iterations > 0 else len(train) // args.examples_per_step
    step_stats = {"tokens": 0, "reward": 0.0}
    trainer = Trainer(args, "rl", model, device, num_iterations, lambda: step_stats["tokens"], model_tag, fixed_shapes=False)
    longest_prompt = max(len(tokenizer.render_for_completion(train[i])) for i in range(len(train)))
    B = trainer.device_batch_size(min(model.config.sequence_len, longest_prompt + args.max_new_tokens))
    per_rank = args.examples_per_step // world_size
    grad_accum = -(-per_rank * args.num_samples // B)  # micro-batches per step (ceil)
    rollout_rows = args.rollout_batch_size if args.rollout_batch_size > 0 else per_rank * args.num_samples
    print0(f"{len(train):,} problems, {args.examples_per_step} per step x {args.num_samples} samples; "
           f"training {num_iterations:,} steps, {grad_accum} micro-batches per rank per step, "
           f"sampling {rollout_rows} rows at a time")
    engine = Engine(model, tokenizer)
    trainer.resume()  # the problems and sampling seeds of a step follow from the step number alone

    queue = deque()

    def next_batch():
        if not queue:  # a new step: sample this rank's problems
            first = trainer.step * args.examples_per_step
            indices = [(first + j) % len(train) for j in range(rank, args.examples_per_step, world_size)]
            batches, rewards = rollout_batches(engine, train, indices, args, B, rollout_rows,
                                               seed=1_000_003 * trainer.step + 7919 * rank)
            engine.release()  # training needs the memory more
            batches += [empty_batch(tokenizer.get_bos_token_id())] * (grad_accum - len(batches))
            counts = torch.tensor([sum(int((y >= 0).sum()) for _, y, _ in batches), sum(rewards), len(rewards)],
                                  dtype=torch.float64, device=device)
            if world_size > 1:
                dist.all_reduce(counts)  # every rank is here at the start of the step
            num_tokens = max(1, int(counts[0]))
            step_stats.update(tokens=num_tokens, reward=(counts[1] / counts[2].clamp(min=1)).item())
            # The trainer divides each micro-batch loss by grad_accum and the optimizer averages
            # ranks; this divisor makes the step's gradient the sum over every sampled token of every
            # rank divided by their number.
            divisor = num_tokens / (grad_accum * world_size)
            queue.extend((x.to(device), y.to(device), a.to(device), divisor) for x, y, a in batches)
        return queue.popleft()

    def evaluate(step, last):
        if not trainer.due(args.eval_every, last):
            return {}
        p1, pk = pass_at_k(engine, test, args, rollout_rows, device, rank, world_size)
        engine.release()
        trainer.loop.update({"pass@1": p1, f"pass@{args.eval_k}": pk})
        print0(f"step {step:05d} | GSM8K pass@1: {p1:.4f} | pass@{args.eval_k}: {pk:.4f}")
        return {"gsm8k/pass@1": p1, f"gsm8k/pass@{args.eval_k}": pk}

    trainer.fit(grad_accum, next_batch, lambda m, batch: policy_gradient_loss(m, *batch), evaluate, lambda: None,
                log_extra=lambda: f" | reward: {step_stats['reward']:.3f}")
    trainer.finish("Chat RL", {k: trainer.loop.get(k) for k in ("pass@1", f"pass@{args.eval_k}")})
    compute_cleanup()


if __name__ == "__main__":
    main()
