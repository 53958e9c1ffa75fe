"""
Training batches made of conversations, for the chat stages.

Midtraining packs: each rendered conversation (cropped to a row if longer) goes whole into a row
of T+1 tokens, chosen best-fit from a small buffer: the longest waiting conversation that still
fits, until none does; the rest of the row is padding. Every token but the padding is a target
(the model learns the whole chat format). A rank's share of the dataset is used exactly once per
epoch, and the packer's position can be saved and restored.

SFT pads: each conversation is its own row, and only the tokens the assistant must produce (the
render mask) are targets.

Targets that do not count are -1, which the model's loss ignores.
"""

import torch


class ConversationPacker:
    def __init__(self, dataset, tokenizer, T, rank=0, world_size=1, buffer_size=64, state=None):
        self.dataset, self.tokenizer, self.row_len = dataset, tokenizer, T + 1
        self.order = range(rank, len(dataset), world_size)  # this rank's share
        self.buffer_size = buffer_size
        state = state or {"cursor": 0, "buffer": []}
        self.cursor, self.buffer = state["cursor"], list(state["buffer"])  # next position in `order`; dataset indices
        self._ids = {}

    def state(self):
        return {"cursor": self.cursor, "buffer": list(self.buffer)}

    def _render(self, index):
        if index not in self._ids:
            self._ids[index] = self.tokenizer.render_conversation(self.dataset[index], max_tokens=self.row_len)[0]
        return self._ids[index]

    def _fill(self):
        while len(self.buffer) < self.buffer_size and self.cursor < len(self.order):
            self.buffer.append(self.order[self.cursor])
            self.cursor += 1

    def next_row(self):
        """(tokens, number of real tokens, dataset indices placed), or None once the epoch is used up."""
        self._fill()
        if not self.buffer:
            return None
        row, placed = [], []
        while True:
            space = self.row_len - len(row)
            fitting = [i for i in self.buffer if len(self._render(i)) <= space]
            if not fitting:
                break
            best = max(fitting, key=lambda i: len(self._render(i)))  # ties: the one waiting longest
            row += self._ids.pop(best)
            placed.append(best)
            self.buffer.remove(best)
            self._fill()
        return row, len(row), placed

    def count_rows(self):
        """Rows one epoch of this rank's share makes (a dry run of a fresh packer)."""
        fresh = ConversationPacker(self.dataset, self.tokenizer, self.row_len - 1, buffer_size=self.buffer_size)
        fresh.order = self.order
        rows = 0
        while fresh.next_row() is not None:
            rows += 1
        return rows


def packed_batch(packer, B, pad_id, device):
    """(inputs, targets) of B packed rows, or None if the epoch ends first."""
    T = packer.row_len - 1
    x = torch.full((B, T), pad_id, dtype=torch.long)
    y = torch.full((B, T), -1, dtype=torch.long)
    for r in range(B):
        item = packer.next_row()
        if item is None:
            return None
        row, n, _ = item
        x[r, : n - 1] = torch.tensor(row[: n - 1])
        y[r, : n - 1] = torch.tensor(row[1:n])
    return x.to(device), y.to(device)


def masked_rows(rows, pad_id, device="cpu"):
    """(inputs, targets) from rows of (token ids, mask), padded to the longest: a position's target
    is the next token where that token's mask is 1, else -1."""
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        ids, mask = torch.tensor(ids), torch.tensor(mask)
        x[r, : len(ids) - 1] = ids[:-1]
        y[r, : len(ids) - 1] = torch.where(mask[1:] == 1, ids[1:], -1)
    return x.to(device), y.to(device)


def sft_batch(conversations, tokenizer, T, pad_id, device):
    """(inputs, targets): one conversation per row, cropped to T+1 tokens, padded; targets only
    where the render mask is 1."""
    return masked_rows([tokenizer.render_conversation(c, max_tokens=T + 1) for c in conversations], pad_id, device)
