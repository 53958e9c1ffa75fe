"""
What every task shares: the Task base class (a sliceable list of conversations that can grade a
model's answer), mixtures and sequences of tasks, the multiple-choice prompt, and reading a
HuggingFace dataset's parquet files through the project's fetcher (no `datasets` library).

A conversation is {"messages": [{"role": "user"|"assistant", "content": ...}, ...]}; an assistant's
content is a string or a list of parts {"type": "text"|"python"|"python_output", "text": ...}.
Multiple-choice conversations also carry "letters", the answer options the model chooses from.
"""

import os
import random

import pyarrow.parquet as pq

from nanochat.common import get_base_dir
from nanochat.download import download, is_valid_parquet

HF_DATASETS = "https://huggingface.co/datasets"


def hf_parquet_rows(repo, *paths):
    """The rows (dicts) of parquet files of a HuggingFace dataset repository, fetched once into
    $NANOCHAT_BASE_DIR/hf_datasets/<repo>/."""
    rows = []
    for path in paths:
        dest = os.path.join(get_base_dir(), "hf_datasets", repo, path)
        download(f"{HF_DATASETS}/{repo}/resolve/main/{path}", dest, validate=is_valid_parquet, progress=False)
        rows += pq.read_table(dest).to_pylist()
    return rows


class Task:
    """Examples start, start+step, ... before stop of the underlying dataset."""

    eval_type = "generative"  # or "categorical": answered by one letter, graded by argmax over the letters

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"bad slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        """Size of the underlying dataset."""
        raise NotImplementedError

    def get_example(self, index):
        """The conversation at `index` of the underlying dataset."""
        raise NotImplementedError

    def evaluate(self, conversation, response):
        """1 if the assistant's `response` (text) answers `conversation` correctly, else 0."""
        raise NotImplementedError

    def reward(self, conversation, response):
        """The RL reward of a response; by default its correctness."""
        return float(self.evaluate(conversation, response))

    def _range(self):
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return range(self.start, stop, self.step)

    def __len__(self):
        return len(self._range())

    def __getitem__(self, i):
        return self.get_example(self._range()[i])


class TaskMixture:
    """All examples of several tasks, shuffled together once with a fixed seed. A task listed twice
    is seen twice as often."""

    def __init__(self, tasks, seed=42):
        self.tasks = tasks
        self.index = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        t, j = self.index[i]
        return self.tasks[t][j]


class TaskSequence:
    """The examples of several tasks one after the other (a curriculum)."""

    def __init__(self, tasks):
        self.tasks = tasks

    def __len__(self):
        return sum(len(t) for t in self.tasks)

    def __getitem__(self, i):
        for task in self.tasks:
            if i < len(task):
                return task[i]
            i -= len(task)
        raise IndexError(i)


LETTERS = "ABCDEFGHIJ"


def render_mc(question, choices, letters=LETTERS):
    """The user's side of a multiple-choice question: the model answers with one letter."""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices))
    return f"{question}\n\n{options}\n\nAnswer with the letter of the correct choice only."


def mc_conversation(question, choices, answer_index):
    letters = list(LETTERS[: len(choices)])
    return {"messages": [{"role": "user", "content": render_mc(question, choices, letters)},
                         {"role": "assistant", "content": letters[answer_index]}],
            "letters": letters}


def mc_evaluate(conversation, response):
    return int(response.strip() == conversation["messages"][-1]["content"])
