"""scripts.chat_web started for real (uvicorn on 127.0.0.1): streaming, validation, the worker pool."""

import json
import threading
import time

import pytest
import requests

from nanochat.checkpoint_manager import load_model


def completion(url, body, **kwargs):
    return requests.post(url + "/chat/completions", json=body, stream=True, timeout=120, **kwargs)


def events(response):
    """The decoded `data:` events of a server-sent event stream."""
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            yield json.loads(line[len("data: "):])


def wait_for(predicate, what, timeout=60):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def user(text):
    return {"role": "user", "content": text}


def test_health_and_page(chat_server):
    health = requests.get(chat_server + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["workers"] == 2 and "sft" in health["model"]
    page = requests.get(chat_server + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="input"' in page.text and "/chat/completions" in page.text


def test_greedy_stream_matches_the_model_without_cache(chat_server, chat_env):
    messages = [user("Hello, who are you?"), {"role": "assistant", "content": "A model."}, user("Tell me more: 日本語 🙂")]
    r = completion(chat_server, {"messages": messages, "temperature": 0, "max_tokens": 24})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    stream = list(events(r))
    assert stream[-1] == {"done": True} and all("token" in e and "part" in e for e in stream[:-1])
    streamed = segments((e["part"], e["token"]) for e in stream[:-1])

    # The same answer computed independently: the model's naive, cache-free greedy decoding, cut
    # at the calculator's marker tokens (an untrained model writes them too), each piece decoded whole.
    model, tokenizer, _ = load_model("sft", "cpu")
    prompt = tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    begins = {tokenizer.encode_special(name): part for name, part in [
        ("<|python_start|>", "python"), ("<|python_end|>", "text"), ("<|output_start|>", "python_output"), ("<|output_end|>", "text")]}
    pieces, run, part = [], [], "text"
    for token in list(model.generate(prompt, max_tokens=24, temperature=0)) + [None]:
        if token is None or token in begins:
            if run:
                pieces.append((part, tokenizer.decode(run)))
            run = []
            if token is not None:
                part = begins[token]
                pieces.append((part, ""))
        else:
            run.append(token)
    assert streamed == segments(pieces)


def segments(pieces):
    """(part, text) pieces as [part, text] runs: an empty piece begins a run, text joins the last."""
    runs = []
    for part, text in pieces:
        if runs and runs[-1][0] == part and text:
            runs[-1][1] += text
        else:
            runs.append([part, text])
    return runs


BIG = "x" * 7000
INVALID = {
    "not json": b"{messages: oops",
    "no messages": {"temperature": 1},
    "messages not a list": {"messages": "hi"},
    "no message": {"messages": []},
    "too many messages": {"messages": [user("a") if i % 2 == 0 else {"role": "assistant", "content": "b"} for i in range(501)]},
    "message too long": {"messages": [user("x" * 8001)]},
    "conversation too long": {"messages": [user(BIG), {"role": "assistant", "content": BIG}] * 2 + [user(BIG)]},
    "empty message": {"messages": [user("")]},
    "content not text": {"messages": [{"role": "user", "content": 123}]},
    "content missing": {"messages": [{"role": "user"}]},
    "unknown role": {"messages": [{"role": "system", "content": "hi"}]},
    "roles do not alternate": {"messages": [user("a"), user("b")]},
    "last message not from the user": {"messages": [user("a"), {"role": "assistant", "content": "b"}]},
    "temperature below 0": {"messages": [user("a")], "temperature": -0.1},
    "temperature above 2": {"messages": [user("a")], "temperature": 2.5},
    "top_k 0": {"messages": [user("a")], "top_k": 0},
    "top_k above 200": {"messages": [user("a")], "top_k": 201},
    "max_tokens 0": {"messages": [user("a")], "max_tokens": 0},
    "max_tokens above 4096": {"messages": [user("a")], "max_tokens": 4097},
    "max_tokens not a number": {"messages": [user("a")], "max_tokens": "lots"},
    "longer than the model's context": {"messages": [user("word " * 1600)]},  # 4,801 tokens > 4,096
    "body over 1 MB": b'{"messages": [{"role": "user", "content": "' + b"y" * (1 << 20) + b'"}]}',
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_requests_get_a_4xx_with_a_reason(chat_server, case):
    body = INVALID[case]
    if isinstance(body, bytes):
        r = requests.post(chat_server + "/chat/completions", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    else:
        r = requests.post(chat_server + "/chat/completions", json=body, timeout=30)
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text[:200])
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail, detail  # one readable line
    for field, allowed in (("temperature", "0 and 2"), ("top_k", "1 and 200"), ("max_tokens", "1 and 4096")):
        if case.startswith(field) and case != "max_tokens not a number":  # out of range: named with its range
            assert detail == f"{field} must be between {allowed}, not {body[field]!r}", detail
    if case == "longer than the model's context":
        assert "start a new chat" in detail and "4096" in detail
    assert requests.get(chat_server + "/health", timeout=10).ok


def test_a_body_without_content_length_is_refused(chat_server):
    def chunks():  # requests sends a generator with chunked transfer encoding, no Content-Length
        yield b'{"messages": [{"role": "user", "content": "'
        yield b"y" * 100_000
        yield b'"}]}'

    r = requests.post(chat_server + "/chat/completions", data=chunks(), headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 411 and "Content-Length" in r.json()["detail"]


def test_sixteen_clients_share_two_workers(chat_server):
    before = requests.get(chat_server + "/stats", timeout=10).json()
    results, seen = [None] * 16, []
    done = threading.Event()

    def client(i):
        r = completion(chat_server, {"messages": [user(f"client {i}")], "max_tokens": 40})
        results[i] = (r.status_code, list(events(r)) if r.ok else r.text)

    def watch():  # what /stats says while they run
        while not done.is_set():
            seen.append(requests.get(chat_server + "/stats", timeout=10).json())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    clients = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    done.set()
    watcher.join()

    for status, stream in results:
        assert status == 200 and stream[-1] == {"done": True}
        assert 1 <= len(stream) - 1 <= 40
    assert max(s["busy"] for s in seen) <= 2
    assert max(s["waiting"] for s in seen) > 0  # more clients than workers: some had to queue
    wait_for(lambda: requests.get(chat_server + "/stats", timeout=10).json()["busy"] == 0, "the workers to be free")
    after = requests.get(chat_server + "/stats", timeout=10).json()
    assert after["requests_served"] - before["requests_served"] == 16


def test_a_client_that_leaves_frees_its_worker(chat_server):
    before = requests.get(chat_server + "/stats", timeout=10).json()
    r = completion(chat_server, {"messages": [user("talk for a long time")], "max_tokens": 4096})
    stream = events(r)
    for _ in range(5):
        assert "token" in next(stream)
    r.close()  # hang up mid-answer

    def freed():
        s = requests.get(chat_server + "/stats", timeout=10).json()
        return s["busy"] == 0 and s["cancelled"] == before["cancelled"] + 1

    # The answer would take ~20 s to reach 4096 tokens; a cancelled one is counted as such, not served.
    wait_for(freed, "the worker to be freed")
    assert requests.get(chat_server + "/stats", timeout=10).json()["requests_served"] == before["requests_served"]
