"""
CORE (DCLM): in-context accuracy of a base model on the tasks of the eval bundle, each centered on
its random baseline, averaged.

How an item is scored. Its few-shot examples are `random.Random(1234 + i).sample` of the task's
other items (i = the item's index in the task file), rendered each followed by a blank line;
`delim` is the task's continuation_delimiter (" " if it has none). Then, per task type:

  multiple_choice    "{query}{delim}" + "{choice}" for every choice: the choice whose tokens have
                     the lowest mean loss is the answer.
  schema             "{context_option}{delim}" + "{continuation}" for every context option: the
                     option under which the shared continuation has the lowest mean loss.
  language_modeling  "{context}{delim}" + "{continuation}": correct when greedy (argmax)
                     prediction reproduces every continuation token.

The context (with <|bos|> in front) and the continuation are tokenized separately, with the
context's trailing whitespace moved to the continuation, as "Answer: Paris" splits as
"Answer:" + " Paris". Sequences longer than the model's context lose tokens from the left.
Accuracy a with baseline b (a fraction) becomes centered (a - b) / (1 - b).
"""

import csv
import json
import os
import random
import shutil
import zipfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from nanochat.common import get_base_dir
from nanochat.download import download

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")


# ---- the bundle ----


def eval_bundle_dir():
    """$NANOCHAT_BASE_DIR/eval_bundle, downloaded and unpacked (atomically) on first use. Under
    torchrun, rank 0 fetches it while the others wait (every rank must call this)."""
    if dist.is_available() and dist.is_initialized():
        folder = _fetch_bundle() if dist.get_rank() == 0 else None
        dist.barrier()
        return folder or os.path.join(get_base_dir(), "eval_bundle")
    return _fetch_bundle()


def _fetch_bundle():
    base = get_base_dir()
    folder = os.path.join(base, "eval_bundle")
    archive = os.path.join(base, "eval_bundle.zip")
    if not os.path.exists(os.path.join(folder, "core.yaml")):
        download(BUNDLE_URL, archive, validate=zipfile.is_zipfile)
    if os.path.exists(os.path.join(folder, "core.yaml")):  # (perhaps unpacked by another process meanwhile)
        return folder
    if os.path.isdir(folder):  # no core.yaml: an unpacking that was cut short
        shutil.rmtree(folder)
    staging = os.path.join(base, f".eval_bundle.unpacking.{os.getpid()}")
    with zipfile.ZipFile(archive) as z:
        z.extractall(staging)
    inner = os.path.join(staging, "eval_bundle")  # the zip holds one top-level folder
    try:
        os.rename(inner if os.path.isdir(inner) else staging, folder)
    except OSError:  # another process unpacked it first
        pass
    shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_tasks(bundle):
    """[{label, path, num_fewshot, task_type, delimiter, baseline}] from core.yaml and the metadata CSV."""
    with open(os.path.join(bundle, "core.yaml")) as f:
        config = yaml.safe_load(f)
    with open(os.path.join(bundle, "eval_meta_data.csv"), newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) / 100 for row in csv.DictReader(f)}
    tasks = []
    for t in config["icl_tasks"]:
        if t["icl_task_type"] not in TASK_TYPES:
            raise ValueError(f"CORE task {t['label']}: unknown task type {t['icl_task_type']!r}")
        tasks.append({"label": t["label"], "path": os.path.join(bundle, "eval_data", t["dataset_uri"]),
                      "num_fewshot": t["num_fewshot"][0], "task_type": t["icl_task_type"],
                      "delimiter": t.get("continuation_delimiter", " "), "baseline": baselines[t["label"]]})
    return tasks


def load_items(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- rendering ----


def render(item, task_type, delimiter, fewshot):
    """The (context, continuation) texts to score for one item: one pair per candidate."""
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [(shots + item["query"] + delimiter, choice) for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [(shots + option + delimiter, item["continuation"]) for option in item["context_options"]]
    shots = "".join(f"{ex['context']}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [(shots + item["context"] + delimiter, item["continuation"])]


def fewshot_examples(items, index, num_fewshot):
    others = [j for j in range(len(items)) if j != index]
    return [items[j] for j in random.Random(1234 + index).sample(others, num_fewshot)]


def tokenize(tokenizer, pairs, max_len):
    """Per pair: (token ids, start, end) with the continuation at ids[start:end], cropped to max_len."""
    out = []
    for context, continuation in pairs:
        stripped = context.rstrip()
        head = tokenizer.encode(stripped, prepend=tokenizer.get_bos_token_id())
        tail = tokenizer.encode(context[len(stripped):] + continuation)
        ids, start = head + tail, len(head)
        drop = max(0, len(ids) - max_len)
        out.append((ids[drop:], max(1, start - drop), len(ids) - drop))
    return out


# ---- scoring ----


@torch.no_grad()
def score_item(model, rows, task_type, device, pad_id):
    """Index of the chosen candidate (or, for language modeling, 1 if reproduced exactly else 0)."""
    width = max(len(ids) for ids, _, _ in rows)
    batch = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for r, (ids, _, _) in enumerate(rows):
        batch[r, : len(ids)] = torch.tensor(ids)
    logits = model(batch.to(device))
    if task_type == "language_modeling":
        ids, start, end = rows[0]
        predicted = logits[0, start - 1 : end - 1].argmax(-1).cpu()
        return int(torch.equal(predicted, torch.tensor(ids[start:end])))
    losses = [F.cross_entropy(logits[r, s - 1 : e - 1], batch[r, s:e].to(device)).item() for r, (_, s, e) in enumerate(rows)]
    return min(range(len(losses)), key=losses.__getitem__)


def evaluate_task(model, tokenizer, task, items, indices, device, rank=0, world_size=1):
    """Accuracy over items[i] for i in `indices` (few-shot examples come from all of `items`);
    this rank scores every world_size-th index and the counts are summed across ranks."""
    max_len, pad_id = model.config.sequence_len, tokenizer.get_bos_token_id()
    correct = 0
    for i in indices[rank::world_size]:
        item = items[i]
        pairs = render(item, task["task_type"], task["delimiter"], fewshot_examples(items, i, task["num_fewshot"]))
        result = score_item(model, tokenize(tokenizer, pairs, max_len), task["task_type"], device, pad_id)
        correct += result if task["task_type"] == "language_modeling" else int(result == item["gold"])
    correct = torch.tensor(correct, dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(correct)
    return correct.item() / len(indices)


def evaluate_core(model, tokenizer, device, max_per_task=-1, rank=0, world_size=1):
    """{"tasks": {label: {"accuracy", "centered", "items"}}, "core": mean centered accuracy}.
    With max_per_task > 0, each task is scored on that many items drawn with a fixed seed."""
    results = {}
    for task in load_tasks(eval_bundle_dir()):
        items = load_items(task["path"])
        indices = list(range(len(items)))
        if max_per_task > 0:
            random.Random(1337).shuffle(indices)
            indices = indices[:max_per_task]
        accuracy = evaluate_task(model, tokenizer, task, items, indices, device, rank, world_size)
        centered = (accuracy - task["baseline"]) / (1 - task["baseline"])
        results[task["label"]] = {"accuracy": accuracy, "centered": centered, "items": len(indices)}
    return {"tasks": results, "core": sum(r["centered"] for r in results.values()) / len(results)}
