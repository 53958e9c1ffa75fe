"""
Serve a trained model over HTTP, with a chat page.

    python -m scripts.chat_web                      # http://127.0.0.1:8000, the newest SFT model
    python -m scripts.chat_web -n 8 --host 0.0.0.0  # 8 GPUs: one model replica each, open to the network

Endpoints: GET / (the chat page), POST /chat/completions (server-sent events
`data: {"token": "...", "part": "text"}` ... `data: {"done": true}`), GET /health, GET /stats.
A part is "text", "python" (a calculator call) or "python_output" (its result); an event with empty
text begins a part. An assistant message sent back may be its list of parts
`[{"type": "python", "text": "42-3"}, ...]`, so that the model sees its calls as it made them.
Each replica answers one request at a time; requests wait for a free one. A client that goes away
stops its answer, which frees the replica.
"""

import asyncio
import json
import os
import random
import sys
import threading
from contextlib import asynccontextmanager
from typing import Literal

import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

import nanochat
from nanochat.chat import ReplyStream, load_chat_model, model_label, reply_budget, stream_reply
from nanochat.common import autodetect_device_type, make_parser
from nanochat.training import parse_args

parser = make_parser(description="Serve a trained model with a web chat UI.")
parser.add_argument("-n", "--num_gpus", type=int, default=1, help="model replicas: one per GPU (on CPU/MPS they share the device)")
parser.add_argument("-i", "--source", choices=["base", "mid", "sft", "rl"], default=None,
                    help="which stage's model (default: sft, else mid, else base)")
parser.add_argument("-g", "--model_tag", default=None, help="checkpoint folder (default: the newest)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default sampling temperature")
parser.add_argument("-k", "--top_k", type=int, default=50, help="default top-k")
parser.add_argument("-m", "--max_tokens", type=int, default=512, help="default longest answer, in tokens")
parser.add_argument("-p", "--port", type=int, default=8000, help="port to serve on")
parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
parser.add_argument("--device_type", default=None, help="cuda|mps|cpu (default: autodetect)")

# Request limits: enough for any real chat, small enough that no request can hog the server.
MAX_MESSAGES, MAX_MESSAGE_CHARS, MAX_TOTAL_CHARS = 500, 8000, 32000
RANGES = {"temperature": (0, 2), "top_k": (1, 200), "max_tokens": (1, 4096)}  # sampling settings, inclusive
MAX_BODY_BYTES = 1 << 20
UI_PATH = os.path.join(os.path.dirname(nanochat.__file__), "ui.html")


class Part(BaseModel):
    """A piece of an assistant message: text, a calculator call, or the call's result."""
    type: Literal["text", "python", "python_output"]
    text: str


class Message(BaseModel):
    role: str
    content: str | list[Part]  # an assistant's answer with calculator calls: its parts, as streamed


def _in_range(name):
    low, high = RANGES[name]
    return Field(None, ge=low, le=high)


class ChatRequest(BaseModel):
    messages: list[Message]
    temperature: float | None = _in_range("temperature")
    top_k: int | None = _in_range("top_k")
    max_tokens: int | None = _in_range("max_tokens")


def validation_message(errors):
    """Pydantic's list of what was wrong with a request, as one readable line."""
    lines = []
    for e in errors:
        where = ".".join(str(part) for part in e["loc"] if part != "body")
        if e["type"] == "json_invalid":
            lines.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})")
        elif where in RANGES and e["type"] in ("greater_than_equal", "less_than_equal"):
            low, high = RANGES[where]
            lines.append(f"{where} must be between {low} and {high}, not {e['input']!r}")
        else:
            lines.append(f"{where or 'body'}: {e['msg'][0].lower()}{e['msg'][1:]}")
    return "; ".join(lines)


def chars(message):
    content = message.content
    return len(content) if isinstance(content, str) else sum(len(part.text) for part in content)


def check_conversation(messages):
    """None if the messages are a conversation we answer, else the reason they are not."""
    if not 1 <= len(messages) <= MAX_MESSAGES:
        return f"send between 1 and {MAX_MESSAGES} messages"
    for i, m in enumerate(messages):
        if m.role != ("user" if i % 2 == 0 else "assistant"):
            return f"message {i}: roles must alternate user, assistant, user, ... (got {m.role!r})"
        if m.role == "user" and not isinstance(m.content, str):
            return f"message {i}: a user's content must be text"
        if not 1 <= chars(m) <= MAX_MESSAGE_CHARS:
            return f"message {i}: content must be 1 to {MAX_MESSAGE_CHARS} characters"
    if sum(chars(m) for m in messages) > MAX_TOTAL_CHARS:
        return f"the conversation is longer than {MAX_TOTAL_CHARS} characters; start a new chat"
    if messages[-1].role != "user":
        return "the last message must be from the user"
    return None


class WorkerPool:
    """Model replicas, each answering one request at a time."""

    def __init__(self, engines):
        self.engines = engines
        self.free = asyncio.Queue()
        for engine in engines:
            self.free.put_nowait(engine)
        self.waiting = 0
        self.served = 0  # answers finished
        self.cancelled = 0  # answers stopped because the client left

    async def acquire(self):
        self.waiting += 1
        try:
            return await self.free.get()
        finally:
            self.waiting -= 1

    def release(self, engine, finished):
        if finished:
            self.served += 1
        else:
            self.cancelled += 1
        self.free.put_nowait(engine)

    def stats(self):
        return {"workers": len(self.engines), "busy": len(self.engines) - self.free.qsize(),
                "waiting": self.waiting, "requests_served": self.served, "cancelled": self.cancelled}


def sse(obj):
    return f"data: {json.dumps(obj)}\n\n"


def generate_in_thread(engine, prompt, budget, temperature, top_k, loop, events, cancelled, on_exit):
    """Sample a reply on a worker thread (the event loop stays free), handing its (part, text)
    pieces (nanochat.chat.ReplyStream) to `events`; stops at the next token once `cancelled` is
    set. Calls on_exit(finished) on the loop."""

    def emit(kind, value=None):
        loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    def run():
        finished = False
        try:
            stream = ReplyStream(engine.tokenizer)
            for token in stream_reply(engine, prompt, budget, temperature, top_k, random.randrange(2**31)):
                if cancelled.is_set():
                    return
                for piece in stream.push(token):
                    emit("token", piece)
            for piece in stream.flush():
                emit("token", piece)
            emit("done")
            finished = True
        except Exception as e:  # report it to the client; the server goes on
            emit("error", f"{type(e).__name__}: {e}")
        finally:
            loop.call_soon_threadsafe(on_exit, finished)

    threading.Thread(target=run, daemon=True).start()


def create_app(engines, args, label):
    tokenizer = engines[0].tokenizer

    @asynccontextmanager
    async def lifespan(app):
        app.state.pool = WorkerPool(engines)
        yield

    app = FastAPI(title="nanochat", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc):
        return JSONResponse({"detail": validation_message(exc.errors())}, status_code=422)

    @app.middleware("http")
    async def limit_body(request, call_next):
        length = request.headers.get("content-length")
        if request.method == "POST" and length is None:  # (a chunked body could be any size)
            return JSONResponse({"detail": "send the body with a Content-Length header"}, status_code=411)
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return JSONResponse({"detail": f"request body larger than {MAX_BODY_BYTES} bytes"}, status_code=413)
        return await call_next(request)

    @app.get("/")
    async def index():
        with open(UI_PATH, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": label, **app.state.pool.stats()}

    @app.get("/stats")
    async def stats():
        return app.state.pool.stats()

    @app.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if reason := check_conversation(body.messages):
            raise HTTPException(400, reason)
        conversation = {"messages": [m.model_dump() for m in body.messages] + [{"role": "assistant", "content": ""}]}
        prompt = tokenizer.render_for_completion(conversation)
        budget = reply_budget(engines[0], prompt, body.max_tokens or args.max_tokens)
        if budget < 1:
            raise HTTPException(400, f"the conversation is {len(prompt)} tokens and the model reads at most "
                                     f"{engines[0].model.config.sequence_len}; start a new chat")
        temperature = args.temperature if body.temperature is None else body.temperature
        top_k = body.top_k or args.top_k
        return StreamingResponse(answer_events(request.app.state.pool, request, prompt, budget, temperature, top_k),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def answer_events(pool, request, prompt, budget, temperature, top_k):
        engine = await pool.acquire()  # a client that leaves while waiting cancels this
        loop, events, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        generate_in_thread(engine, prompt, budget, temperature, top_k, loop, events, cancelled,
                           on_exit=lambda finished: pool.release(engine, finished))
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:  # quiet for a while: is anyone still listening?
                    if await request.is_disconnected():
                        return
                    continue
                if kind == "token":
                    part, text = value
                    yield sse({"token": text, "part": part})
                elif kind == "done":
                    yield sse({"done": True})
                    return
                else:
                    yield sse({"error": value})
                    return
        finally:
            cancelled.set()  # the client left (or we are done): free the replica at the next token

    return app


def main():
    args = parse_args(parser)
    for name, value in (("temperature", args.temperature), ("top_k", args.top_k), ("max_tokens", args.max_tokens)):
        if not RANGES[name][0] <= value <= RANGES[name][1]:
            parser.error(f"--{name} must be between {RANGES[name][0]} and {RANGES[name][1]}, not {value}")
    if args.num_gpus < 1:
        parser.error(f"--num_gpus must be at least 1, not {args.num_gpus}")
    device_type = args.device_type or autodetect_device_type()
    if device_type == "cuda" and args.num_gpus > torch.cuda.device_count():
        parser.error(f"-n {args.num_gpus}: only {torch.cuda.device_count()} GPUs here")
    devices = [f"cuda:{i}" for i in range(args.num_gpus)] if device_type == "cuda" else [device_type] * args.num_gpus
    try:
        loaded = [load_chat_model(args.source, device, args.model_tag, args.step) for device in devices]
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"chat_web: {e}")
    engines = [engine for engine, _, _ in loaded]
    _, meta, source = loaded[0]
    label = model_label(engines[0], meta, source)
    print(f"serving the {label} model on {len(engines)} replica(s): http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(create_app(engines, args, label), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
