"""
Talk to a trained model in the terminal.

    python -m scripts.chat_cli                                  # the newest SFT model (else mid, else base)
    python -m scripts.chat_cli -i base -p "The capital of France is"   # answer once and exit

In the conversation: `clear` starts over, `quit`/`exit` or Ctrl-D leave, Ctrl-C stops an answer.
A base model has never seen a conversation, so with `-i base` each line is simply continued.
"""

import importlib
import random
import sys

from nanochat.chat import ReplyStream, load_chat_model, model_label, reply_budget, stream_reply
from nanochat.common import autodetect_device_type, float_flag, int_flag, make_parser
from nanochat.training import parse_args

parser = make_parser(description="Chat with a trained model in the terminal.")
parser.add_argument("-i", "--source", choices=["base", "mid", "sft", "rl"], default=None,
                    help="which stage's model (default: sft, else mid, else base)")
parser.add_argument("-g", "--model_tag", default=None, help="checkpoint folder (default: the newest)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("-p", "--prompt", default="", help="answer this once and exit")
parser.add_argument("-t", "--temperature", type=float_flag(0, 2), default=0.6, help="sampling temperature (0 = greedy)")
parser.add_argument("-k", "--top_k", type=int_flag(1), default=50, help="sample among the k most likely tokens")
parser.add_argument("-m", "--max_tokens", type=int_flag(1), default=512, help="longest answer, in tokens")
parser.add_argument("--device_type", default=None, help="cuda|mps|cpu (default: autodetect)")


class Conversation:
    """The token history of a chat (or, for a base model, just the line being continued)."""

    def __init__(self, engine, complete_only):
        self.engine, self.complete_only = engine, complete_only
        tok = engine.tokenizer
        self.bos = tok.get_bos_token_id()
        self.user_start, self.user_end = tok.encode_special("<|user_start|>"), tok.encode_special("<|user_end|>")
        self.assistant_start = tok.encode_special("<|assistant_start|>")
        self.assistant_end = tok.encode_special("<|assistant_end|>")
        self.clear()

    def clear(self):
        self.tokens = [self.bos]

    def prompt_for(self, text):
        if self.complete_only:
            return [self.bos, *self.engine.tokenizer.encode(text)]
        return [*self.tokens, self.user_start, *self.engine.tokenizer.encode(text), self.user_end, self.assistant_start]

    def record(self, prompt, reply):
        if not self.complete_only:
            self.tokens = [*prompt, *reply, self.assistant_end]


def answer(conversation, text, args, out=sys.stdout):
    """Stream the answer to `text`; Ctrl-C stops it early. The conversation keeps what was said."""
    engine = conversation.engine
    prompt = conversation.prompt_for(text)
    budget = reply_budget(engine, prompt, args.max_tokens)
    if budget < 1:
        print(f"(that would not fit in the model's {engine.model.config.sequence_len}-token context; "
              "type 'clear' to start over)", file=out)
        return
    if not conversation.complete_only:
        print("Assistant: ", end="", file=out, flush=True)
    reply, stream, shown = [], ReplyStream(engine.tokenizer), CallsInBrackets()
    try:
        for token in stream_reply(engine, prompt, budget, args.temperature, args.top_k, random.randrange(2**31)):
            reply.append(token)
            print(shown.text(stream.push(token)), end="", file=out, flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", end="", file=out)
    print(shown.text(stream.flush()) + shown.close(), file=out, flush=True)
    conversation.record(prompt, reply)  # the tokens as sampled: a follow-up sees exactly what the model wrote


class CallsInBrackets:
    """How a reply reads in the terminal: its text, with a calculator call and its result as
    [python: 42-3 = 39]. The bracket closes when text follows (a call may still get its result)."""

    def __init__(self):
        self.open = False

    def text(self, pieces):
        out = []
        for part, text in pieces:
            if part == "python" and not text:  # a call begins
                out.append(self.close() + "[python: ")
                self.open = True
            elif part == "python_output" and not text:
                out.append(" = ")
            elif text:
                out.append((self.close() if part == "text" else "") + text)
        return "".join(out)

    def close(self):
        was_open, self.open = self.open, False
        return "]" if was_open else ""


def repl(conversation, args):
    try:
        importlib.import_module("readline")  # line editing and history for input()
    except ImportError:
        pass
    label = "Text" if conversation.complete_only else "User"
    print("Type 'clear' to start over, 'quit' or Ctrl-D to leave, Ctrl-C to stop an answer.")
    while True:
        try:
            line = input(f"\n{label}: ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # at the prompt: drop the line, like a shell
            print()
            continue
        command = line.strip()
        if command in ("quit", "exit"):
            return
        if command == "clear":
            conversation.clear()
            print("(conversation cleared)")
        elif command:
            answer(conversation, line, args)


def main():
    args = parse_args(parser)
    try:
        engine, meta, source = load_chat_model(args.source, args.device_type or autodetect_device_type(),
                                               args.model_tag, args.step)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"chat_cli: {e}")
    print(f"model: {model_label(engine, meta, source)}")
    conversation = Conversation(engine, complete_only=(source == "base"))
    if args.prompt:
        if conversation.complete_only:
            print(args.prompt, end="", flush=True)
        answer(conversation, args.prompt, args)
    else:
        repl(conversation, args)


if __name__ == "__main__":
    main()
