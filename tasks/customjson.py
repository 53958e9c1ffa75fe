"""Conversations from a JSONL file: each line a list of messages, or {"messages": [...]}."""

import json
import os

import nanochat
from nanochat.tokenizer import validated_messages
from tasks.common import Task

# Who the assistant says it is: written for this project by dev/gen_identity_conversations.py.
IDENTITY_CONVERSATIONS = os.path.join(os.path.dirname(nanochat.__file__), "data", "identity_conversations.jsonl")


class CustomJSON(Task):
    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        self.conversations = []
        with open(filepath, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    conversation = {"messages": item} if isinstance(item, list) else item
                    validated_messages(conversation)
                except ValueError as e:  # json.JSONDecodeError is one
                    raise ValueError(f"{filepath} line {number}: {e}") from None
                self.conversations.append(conversation)

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]
