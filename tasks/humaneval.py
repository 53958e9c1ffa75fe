"""HumanEval (openai/openai_humaneval): 164 Python functions to complete, graded by running their
unit tests in the sandbox (nanochat/execution.py)."""

import re

from nanochat.execution import execute_code
from tasks.common import Task, hf_parquet_rows

CODE_BLOCK = re.compile(r"```(?:python|py)?\n(.*?)```", re.S)


def extract_program(response):
    """The code of a response: its first fenced block if it has one, else all of it."""
    m = CODE_BLOCK.search(response)
    return m.group(1) if m else response


def prompt_imports(prompt):
    return "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))


class HumanEval(Task):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rows = hf_parquet_rows("openai/openai_humaneval", "openai_humaneval/test-00000-of-00001.parquet")

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}],
                "test": row["test"], "entry_point": row["entry_point"]}

    def evaluate(self, conversation, response):
        program = "\n\n".join([prompt_imports(conversation["messages"][0]["content"]), extract_program(response),
                               conversation["test"], f"check({conversation['entry_point']})"])
        return int(execute_code(program, timeout=10.0).success)
