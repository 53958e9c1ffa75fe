"""MMLU: 57 subjects of four-choice exam questions. cais/mmlu: subset `all` (splits test,
validation, dev) and `auxiliary_train` (split train, for training)."""

from tasks.common import Task, hf_parquet_rows, mc_conversation, mc_evaluate


class MMLU(Task):
    eval_type = "categorical"

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        if (subset, split) not in {("all", "test"), ("all", "validation"), ("all", "dev"), ("auxiliary_train", "train")}:
            raise ValueError(f"MMLU: use all/test|validation|dev or auxiliary_train/train, got {subset}/{split}")
        rows = hf_parquet_rows("cais/mmlu", f"{subset}/{split}-00000-of-00001.parquet")
        self.rows = [r["train"] for r in rows] if subset == "auxiliary_train" else rows  # one struct column there

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        conversation = mc_conversation(row["question"], row["choices"], row["answer"])
        conversation["subject"] = row["subject"]
        return conversation

    def evaluate(self, conversation, response):
        return mc_evaluate(conversation, response)
