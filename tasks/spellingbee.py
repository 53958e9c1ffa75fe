"""
Letter skills that tokenization hides from the model. SpellingBee: "how many r are in
strawberry?", answered by spelling the word out, counting, and checking with a python call.
SimpleSpelling: spell a word letter by letter. Words come from the dwyl english-words list;
examples are generated from a per-index seed, with train and test drawing from disjoint seeds.
"""

import os
import random
import string
from functools import lru_cache

from nanochat.common import get_base_dir
from nanochat.download import download
from tasks.common import Task
from tasks.gsm8k import extract_answer

WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
TEST_SEED_OFFSET = 10_000_000  # test examples use seeds no train example uses

QUESTIONS = [
    "How many {letter} are in the word {word}?",
    "How many times does the letter {letter} appear in {word}?",
    "Count the {letter}'s in {word}.",
    "In the word {word}, how many {letter} are there?",
    "how many {letter} in {word}",
    "What is the number of {letter} letters in {word}?",
]


@lru_cache(maxsize=1)
def word_list():
    path = os.path.join(get_base_dir(), "words_alpha.txt")
    download(WORDS_URL, path, validate=lambda p: os.path.getsize(p) > 0, progress=False)
    with open(path, encoding="utf-8") as f:
        return [w for w in (line.strip() for line in f) if w.isalpha() and w.isascii()]


class _Generated(Task):
    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test") or size < 1:
            raise ValueError(f"{type(self).__name__}: split is train or test and size >= 1, got {split}, {size}")
        self.size, self.offset = size, 0 if split == "train" else TEST_SEED_OFFSET
        self.words = word_list()

    def num_examples(self):
        return self.size

    def rng(self, index):
        return random.Random(self.offset + index)


class SpellingBee(_Generated):
    def get_example(self, index):
        rng = self.rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
        quote = rng.choice(["", "'", '"'])
        question = rng.choice(QUESTIONS).format(letter=f"{quote}{letter}{quote}", word=f"{quote}{word}{quote}")
        count, lines = 0, []
        for i, c in enumerate(word, 1):
            count += c == letter
            lines.append(f"{i}. {c}" + (f" <- {letter} number {count}" if c == letter else ""))
        spelled = (f"Let me spell '{word}' one letter at a time and count the '{letter}'s.\n\n" + "\n".join(lines)
                   + f"\n\nThat makes {count}. Checking with Python:\n\n")
        parts = [{"type": "text", "text": spelled}, {"type": "python", "text": f"'{word}'.count('{letter}')"},
                 {"type": "python_output", "text": str(word.count(letter))},
                 {"type": "text", "text": f"\n\nPython agrees: {count}.\n\n#### {count}"}]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "answer": count}

    def evaluate(self, conversation, response):
        answer = extract_answer(response)
        return int(answer is not None and answer == conversation["answer"])


class SimpleSpelling(_Generated):
    def get_example(self, index):
        word = self.rng(index).choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": f"{word}:{','.join(word)}"}]}

    def evaluate(self, conversation, response):
        return int(response.strip() == conversation["messages"][-1]["content"])
