"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations for SFT."""

from tasks.common import Task, hf_parquet_rows

FILES = {"train": [f"data/train-{i:05d}-of-00004.parquet" for i in range(4)], "test": ["data/test-00000-of-00001.parquet"]}


class SmolTalk(Task):
    def __init__(self, split, **kwargs):
        super().__init__(**kwargs)
        if split not in FILES:
            raise ValueError(f"SmolTalk: split is train or test, got {split}")
        self.rows = hf_parquet_rows("HuggingFaceTB/smol-smoltalk", *FILES[split])

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in self.rows[index]["messages"]]}
