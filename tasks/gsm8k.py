"""
GSM8K: grade-school math word problems (openai/gsm8k, subset `main`, splits train / test).

Reference solutions mark calculator steps as `<<48/2=24>>`; each becomes a python tool call (the
expression) followed by its output (the result), so the model learns to use the calculator. The
final answer follows `####`; answers are compared as numbers (commas dropped, 3.50 == 3.5).
"""

import re
from decimal import Decimal, InvalidOperation

from tasks.common import Task, hf_parquet_rows

ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
FINAL_ANSWER = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


def solution_parts(solution):
    """The reference solution as assistant parts: text, python (expression), python_output (result)."""
    parts, pos = [], 0
    for m in ANNOTATION.finditer(solution):
        if m.start() > pos:
            parts.append({"type": "text", "text": solution[pos : m.start()]})
        parts += [{"type": "python", "text": m.group(1)}, {"type": "python_output", "text": m.group(2)}]
        pos = m.end()
    if pos < len(solution):
        parts.append({"type": "text", "text": solution[pos:]})
    return parts


def parts_to_solution(parts):
    """The inverse of solution_parts."""
    out = []
    for part in parts:
        if part["type"] == "python":
            out.append(f"<<{part['text']}=")
        elif part["type"] == "python_output":
            out.append(f"{part['text']}>>")
        else:
            out.append(part["text"])
    return "".join(out)


def extract_answer(text):
    """The number after the last `####`, as a Decimal; None if there is none."""
    matches = FINAL_ANSWER.findall(text)
    if not matches:
        return None
    try:
        return Decimal(matches[-1].replace(",", ""))
    except InvalidOperation:
        return None


class GSM8K(Task):
    def __init__(self, split, subset="main", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test") or subset not in ("main", "socratic"):
            raise ValueError(f"GSM8K: subset main|socratic and split train|test, got {subset}/{split}")
        self.rows = hf_parquet_rows("openai/gsm8k", f"{subset}/{split}-00000-of-00001.parquet")

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": solution_parts(row["answer"])}]}

    def evaluate(self, conversation, response):
        reference = parts_to_solution(conversation["messages"][-1]["content"])
        truth, answer = extract_answer(reference), extract_answer(response)
        return int(truth is not None and answer is not None and truth == answer)
