"""
The tokenizer: trained with rustbpe (our Rust BPE), run with tiktoken (fast encoding).

Besides the BPE vocabulary it has the special tokens of the chat format, and it renders chat
conversations into token ids plus a mask of the tokens the assistant must learn to produce.
"""

import base64
import copy
import hashlib
import json
import os
from functools import lru_cache

import rustbpe
import tiktoken
import tiktoken.load

from nanochat.common import get_base_dir
from nanochat.download import download

SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, written back into the conversation
]

# GPT-4's split pattern, but digits are grouped by at most 2 (not 3): with a small vocabulary,
# fewer tokens are spent on the many 3-digit numbers.
SPLIT_PATTERN = rustbpe.GPT4_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}{1,2}")

_OPENAI = "https://openaipublic.blob.core.windows.net"
PRETRAINED = {  # name -> files and their sha256, as tiktoken checks them
    "gpt2": {
        "vocab.bpe": (f"{_OPENAI}/gpt-2/encodings/main/vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
        "encoder.json": (f"{_OPENAI}/gpt-2/encodings/main/encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    },
    "cl100k_base": {
        "cl100k_base.tiktoken": (f"{_OPENAI}/encodings/cl100k_base.tiktoken", "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
    },
}
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _sha256_is(expected):
    def check(path):
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest() == expected
    return check


def _write_atomic(path, data: bytes):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class RustBPETokenizer:
    def __init__(self, enc: tiktoken.Encoding, bos_token: str):
        self.enc = enc
        self.bos_token_id = self.encode_special(bos_token)

    # ---- construction ----

    @classmethod
    def train_from_iterator(cls, texts, vocab_size):
        """Train on an iterator of str. `vocab_size` includes the special tokens."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens), got {vocab_size}")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(texts, vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        ranks = dict(bpe.get_mergeable_ranks())
        return cls(cls._encoding(bpe.get_pattern(), ranks), "<|bos|>")

    @staticmethod
    def _encoding(pattern, ranks):
        specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        return tiktoken.Encoding(name="rustbpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)

    @classmethod
    def from_pretrained(cls, name):
        """GPT-2's or GPT-4's tokenizer ("gpt2" | "cl100k_base"), fetched through our downloader."""
        if name not in PRETRAINED:
            raise ValueError(f"unknown pretrained tokenizer {name!r}; choose one of {sorted(PRETRAINED)}")
        folder = os.path.join(get_base_dir(), "tokenizer_refs", name)
        paths = {}
        for fname, (url, sha) in PRETRAINED[name].items():
            paths[fname] = os.path.join(folder, fname)
            download(url, paths[fname], validate=_sha256_is(sha), progress=False)
        if name == "gpt2":
            ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(paths["vocab.bpe"], paths["encoder.json"])
            enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
        else:
            ranks = tiktoken.load.load_tiktoken_bpe(paths["cl100k_base.tiktoken"])
            specials = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}
            enc = tiktoken.Encoding("cl100k_base", pat_str=rustbpe.GPT4_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
        return cls(enc, "<|endoftext|>")

    def save(self, folder):
        """Write tokenizer.json (pattern, ranks, special tokens) and token_bytes.pt, each atomically."""
        import torch

        os.makedirs(folder, exist_ok=True)
        ranks = self.enc._mergeable_ranks
        state = {
            "pattern": self.enc._pat_str,
            "ranks": [base64.b64encode(b).decode("ascii") for b, _ in sorted(ranks.items(), key=lambda kv: kv[1])],
            "special_tokens": self.enc._special_tokens,
            "bos_token": self.id_to_token(self.bos_token_id),
        }
        _write_atomic(os.path.join(folder, "tokenizer.json"), json.dumps(state).encode())
        tmp = os.path.join(folder, f"token_bytes.pt.tmp{os.getpid()}")
        torch.save(self.token_bytes(), tmp)
        os.replace(tmp, os.path.join(folder, "token_bytes.pt"))

    @classmethod
    def from_directory(cls, folder):
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer at {path}; train one with `python -m scripts.tok_train`")
        try:
            with open(path, "rb") as f:
                state = json.load(f)
            ranks = {base64.b64decode(b): i for i, b in enumerate(state["ranks"])}
            enc = tiktoken.Encoding("rustbpe", pat_str=state["pattern"], mergeable_ranks=ranks, special_tokens=state["special_tokens"])
            return cls(enc, state["bos_token"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"corrupt tokenizer file {path} ({e}); retrain with `python -m scripts.tok_train`") from None

    def token_bytes(self):
        """UTF-8 length in bytes of every token id (0 for special tokens), for bits per byte."""
        import torch

        lengths = [0] * self.get_vocab_size()
        for b, i in self.enc._mergeable_ranks.items():
            lengths[i] = len(b)
        return torch.tensor(lengths, dtype=torch.int32)

    # ---- vocabulary ----

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return self.enc.special_tokens_set

    def id_to_token(self, token_id):
        return self.enc.decode([token_id])

    @lru_cache(maxsize=64)
    def encode_special(self, text):
        return self.enc.encode_single_token(text)

    def get_bos_token_id(self):
        return self.bos_token_id

    # ---- encoding ----

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """str -> list of ids, or list[str] -> list of lists. Special-token text is encoded as
        ordinary text; `prepend`/`append` add a token (an id or a special token's name) to each."""
        extra = [self._token_id(t) if t is not None else None for t in (prepend, append)]
        if isinstance(text, str):
            return self._wrap(self.enc.encode_ordinary(text), *extra)
        if isinstance(text, list):
            return [self._wrap(ids, *extra) for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]
        raise TypeError(f"encode expects str or list[str], got {type(text).__name__}")

    def _token_id(self, token):
        return token if isinstance(token, int) else self.encode_special(token)

    @staticmethod
    def _wrap(ids, first, last):
        return ([first] if first is not None else []) + ids + ([last] if last is not None else [])

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        return self.enc.decode(ids)

    def decode_bytes(self, ids):
        """The raw bytes of ids: a token may end inside a UTF-8 character."""
        return self.enc.decode_bytes(ids)

    # ---- chat ----

    def render_conversation(self, conversation, max_tokens=2048):
        """
        Token ids of a chat conversation and a mask: 1 on tokens the assistant must learn (its
        text, its python calls, <|assistant_end|>), 0 elsewhere (user text, tool output, framing).
        A system message is folded into the first user message. Cut to `max_tokens`.
        """
        messages = validated_messages(conversation)
        ids, mask = [], []

        def add(tokens, learn):
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([int(learn)] * len(tokens))

        special = self.encode_special
        add(self.get_bos_token_id(), False)
        for message in messages:
            if message["role"] == "user":
                add(special("<|user_start|>"), False)
                add(self.encode(message["content"]), False)
                add(special("<|user_end|>"), False)
                continue
            add(special("<|assistant_start|>"), False)
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                tokens = self.encode(part["text"])
                if part["type"] == "text":
                    add(tokens, True)
                elif part["type"] == "python":
                    add([special("<|python_start|>"), *tokens, special("<|python_end|>")], True)
                else:  # python_output: produced by the tool, not by the model
                    add([special("<|output_start|>"), *tokens, special("<|output_end|>")], False)
            add(special("<|assistant_end|>"), True)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """Ids to prime the assistant's answer: the conversation without its last (assistant)
        message, followed by <|assistant_start|>."""
        messages = validated_messages(conversation)
        if messages[-1]["role"] != "assistant":
            raise ValueError("render_for_completion needs a conversation that ends with an assistant message")
        ids, _ = self.render_conversation({"messages": messages[:-1]}, max_tokens=1 << 62)
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize_tokenization(self, ids, mask=None, with_token_id=False):
        """The tokens as a terminal string: alternating shades, green where mask is 1."""
        shades = ["\033[48;5;236m", "\033[48;5;239m"]
        out = []
        for i, token_id in enumerate(ids):
            color = "\033[42m" if mask is not None and mask[i] else shades[i % 2]
            text = self.id_to_token(token_id) + (f"[{token_id}]" if with_token_id else "")
            out.append(f"{color}{text}\033[0m")
        return "".join(out)


def validated_messages(conversation):
    """The messages with any system message merged into the first user message; ValueError if
    the conversation is malformed."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError('a conversation is a dict {"messages": [...]}')
    messages = copy.deepcopy(conversation["messages"])
    if not messages:
        raise ValueError("the conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: needs a role of system, user or assistant")
        content = m.get("content")
        if m["role"] != "assistant" and not isinstance(content, str):
            raise ValueError(f"message {i}: {m['role']} content must be a str")
        if m["role"] == "assistant" and not isinstance(content, (str, list)):
            raise ValueError(f"message {i}: assistant content must be a str or a list of parts")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in ("text", "python", "python_output"):
                    raise ValueError(f"message {i} part {j}: type must be text, python or python_output")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"message {i} part {j}: text must be a str")
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
        messages = messages[1:]
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"roles must alternate user/assistant starting with user; message {i} is {m['role']}")
    return messages


def get_tokenizer():
    """The tokenizer trained by scripts.tok_train, from $NANOCHAT_BASE_DIR/tokenizer."""
    return RustBPETokenizer.from_directory(os.path.join(get_base_dir(), "tokenizer"))


def get_token_bytes(device="cpu"):
    """The token_bytes tensor saved beside the tokenizer."""
    import torch

    path = os.path.join(get_base_dir(), "tokenizer", "token_bytes.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {path}; train a tokenizer with `python -m scripts.tok_train`")
    return torch.load(path, map_location=device)
