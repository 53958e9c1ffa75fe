"""
Talking to a trained model, shared by the terminal and the web front ends: which checkpoint to
serve, how much room the context leaves for a reply, and streaming a reply as text without ever
splitting a character (a byte-level token can end in the middle of a UTF-8 sequence).
"""

import codecs
import sys

from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine

DEFAULT_SOURCES = ["sft", "mid", "base"]  # without -i: the most finished model that exists


def load_chat_model(source, device, model_tag=None, step=None):
    """(engine, meta, source). With source None, the first of DEFAULT_SOURCES that has
    checkpoints, saying on stderr which were missing."""
    missing = []
    for candidate in [source] if source else DEFAULT_SOURCES:
        try:
            model, tokenizer, meta = load_model(candidate, device, model_tag=model_tag, step=step)
        except FileNotFoundError as e:
            if source:
                raise
            missing.append((candidate, str(e)))
            continue
        if missing:
            print(f"no {' or '.join(m for m, _ in missing)} model; using the {candidate} model", file=sys.stderr)
        return Engine(model, tokenizer), meta, candidate
    raise FileNotFoundError("; ".join(reason for _, reason in missing))


def model_label(engine, meta, source):
    """What is being served, e.g. 'sft, step 700 (bfloat16 on cuda:0)'."""
    weight = engine.model.lm_head.weight
    return f"{source}, step {meta['step']} ({str(engine.model.compute_dtype).removeprefix('torch.')} on {weight.device})"


def reply_budget(engine, prompt, max_tokens):
    """How many tokens a reply to `prompt` may take: max_tokens, capped by the model's context."""
    return min(max_tokens, engine.model.config.sequence_len - len(prompt))


def sample_replies(engine, conversations, num_samples, max_tokens, temperature, top_k, seed, batch_rows=None):
    """For each conversation, (sequences, masks, texts) of num_samples replies (sequences start with
    the prompt; texts are the decoded replies); all empty for one whose prompt fills the context.
    The engine samples batch_rows rows at a time (default: every row at once), whole
    conversations to a batch; a batch is seeded with seed + the index of its first conversation."""
    prompts = [engine.tokenizer.render_for_completion(c) for c in conversations]
    fitting = [i for i, p in enumerate(prompts) if reply_budget(engine, p, max_tokens) >= 1]
    per_batch = max(1, (batch_rows or len(fitting) * num_samples) // num_samples)
    results = [([], [], []) for _ in conversations]
    for b in range(0, len(fitting), per_batch):
        chunk = fitting[b : b + per_batch]
        generated = engine.generate_many([prompts[i] for i in chunk], num_samples, max_tokens=max_tokens,
                                         temperature=temperature, top_k=top_k, seed=seed + b)
        for i, (sequences, masks) in zip(chunk, generated):
            results[i] = (sequences, masks, [engine.tokenizer.decode(s[len(prompts[i]):]) for s in sequences])
    return results


def stream_reply(engine, prompt, max_tokens, temperature, top_k, seed):
    """Token ids of one reply as they are sampled, without the closing <|assistant_end|>."""
    for tokens, _ in engine.generate(prompt, 1, max_tokens, temperature, top_k, seed):
        if tokens[0] in engine.stop:
            return
        yield tokens[0]


class ReplyStream:
    """
    A reply's token ids in, readable pieces out: (part, text), where part is "text", "python" (a
    calculator call the model wrote) or "python_output" (the tool's result, which the engine
    forced in), as in a conversation's message parts. The marker tokens around calls and results
    are not text: each gives an empty piece of the part it begins, so a reader sees a part begin
    before its text. The bytes of a character split across tokens are held back until the
    character is complete (invalid bytes become U+FFFD).
    """

    def __init__(self, tokenizer):
        special = tokenizer.encode_special
        self.begins = {special("<|python_start|>"): "python", special("<|python_end|>"): "text",
                       special("<|output_start|>"): "python_output", special("<|output_end|>"): "text"}
        self.tokenizer, self.part = tokenizer, "text"
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        """The pieces that one more token completes (a list, often of one piece, maybe empty)."""
        if token_id in self.begins:
            pieces = self.flush()
            self.part = self.begins[token_id]
            return pieces + [(self.part, "")]
        text = self.decoder.decode(self.tokenizer.decode_bytes([token_id]))
        return [(self.part, text)] if text else []

    def flush(self):
        """What is held back, at the end of the reply."""
        text = self.decoder.decode(b"", final=True)
        return [(self.part, text)] if text else []

