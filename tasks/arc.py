"""ARC (AI2 Reasoning Challenge): grade-school science questions with 3-5 choices.
allenai/ai2_arc, subsets ARC-Easy and ARC-Challenge, splits train / validation / test."""

from tasks.common import Task, hf_parquet_rows, mc_conversation, mc_evaluate


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge") or split not in ("train", "validation", "test"):
            raise ValueError(f"ARC: subset is ARC-Easy|ARC-Challenge and split train|validation|test, got {subset}/{split}")
        self.rows = hf_parquet_rows("allenai/ai2_arc", f"{subset}/{split}-00000-of-00001.parquet")

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        labels = list(row["choices"]["label"])
        return mc_conversation(row["question"], row["choices"]["text"], labels.index(row["answerKey"]))

    def evaluate(self, conversation, response):
        return mc_evaluate(conversation, response)
