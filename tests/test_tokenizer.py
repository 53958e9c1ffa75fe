"""nanochat/tokenizer.py and the tok_train / tok_eval scripts."""

import os
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_module
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer
from test_rustbpe import mirror_docs


@pytest.fixture(scope="module")
def tok(shared_mirror):
    return RustBPETokenizer.train_from_iterator(iter(mirror_docs(shared_mirror)[:300]), 2048)


def test_vocab_and_specials(tok):
    assert tok.get_vocab_size() == 2048
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS)
    ids = [tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(2048 - len(SPECIAL_TOKENS), 2048))
    assert tok.get_bos_token_id() == ids[0] and tok.id_to_token(ids[0]) == "<|bos|>"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=["Cs"])))
def test_decode_encode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(SPECIAL_TOKENS + ["hi", " ", "<|", "|>", "bos", "\n"]), max_size=20))
def test_specials_never_come_from_ordinary_text(tok, pieces):
    text = "".join(pieces)
    ids = tok.encode(text)
    assert all(i < tok.get_vocab_size() - len(SPECIAL_TOKENS) for i in ids)
    assert tok.decode(ids) == text


def test_encode_batch_prepend_append(tok):
    bos = tok.get_bos_token_id()
    texts = ["hello world", "", "the end"]
    batch = tok.encode(texts, prepend="<|bos|>", append=tok.encode_special("<|assistant_end|>"))
    assert batch == [[bos] + tok.encode(t) + [tok.encode_special("<|assistant_end|>")] for t in texts]
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_render_conversation_with_tool_use(tok):
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12*7?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "12*7"},
            {"type": "python_output", "text": "84"},
            {"type": "text", "text": "It is 84."},
        ]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    ids, mask = tok.render_conversation(conv)
    s, e = tok.encode_special, tok.encode
    expected = [  # (tokens, mask) built by hand from the format's rules
        ([s("<|bos|>")], 0),
        ([s("<|user_start|>")] + e("Be brief.\n\nWhat is 12*7?") + [s("<|user_end|>")], 0),
        ([s("<|assistant_start|>")], 0),
        (e("Let me compute. "), 1),
        ([s("<|python_start|>")] + e("12*7") + [s("<|python_end|>")], 1),
        ([s("<|output_start|>")] + e("84") + [s("<|output_end|>")], 0),
        (e("It is 84."), 1),
        ([s("<|assistant_end|>")], 1),
        ([s("<|user_start|>")] + e("Thanks") + [s("<|user_end|>")], 0),
        ([s("<|assistant_start|>")], 0),
        (e("You're welcome.") + [s("<|assistant_end|>")], 1),
    ]
    assert ids == [t for tokens, _ in expected for t in tokens]
    assert mask == [m for tokens, m in expected for _ in tokens]
    assert conv["messages"][0]["content"] == "Be brief."  # the caller's conversation is untouched

    cut_ids, cut_mask = tok.render_conversation(conv, max_tokens=10)
    assert cut_ids == ids[:10] and cut_mask == mask[:10]

    prompt = tok.render_for_completion(conv)
    first_turns = {"messages": conv["messages"][:4]}
    assert prompt == tok.render_conversation(first_turns)[0] + [s("<|assistant_start|>")]


@pytest.mark.parametrize("conv, problem", [
    ({"messages": []}, "no messages"),
    ([{"role": "user", "content": "hi"}], "dict"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "alternate"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "alternate"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "alternate"),
    ({"messages": [{"role": "system", "content": "s"}]}, "followed by a user"),
    ({"messages": [{"role": "robot", "content": "a"}]}, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "must be a str"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]}, "type must be"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text"}]}]}, "text must be a str"),
])
def test_malformed_conversations(tok, conv, problem):
    with pytest.raises(ValueError, match=problem):
        tok.render_conversation(conv)


def test_save_and_reload(tok, tmp_path):
    folder = tmp_path / "tokenizer"
    tok.save(str(folder))
    assert sorted(os.listdir(folder)) == ["token_bytes.pt", "tokenizer.json"]
    again = RustBPETokenizer.from_directory(str(folder))
    text = "Reloaded tokenizers encode the same: 12345 ünï 日本"
    assert again.encode(text) == tok.encode(text)
    assert again.get_bos_token_id() == tok.get_bos_token_id()
    token_bytes = torch.load(folder / "token_bytes.pt")
    assert len(token_bytes) == tok.get_vocab_size()
    for i in (0, 100, 500, 2000):
        expected = 0 if tok.id_to_token(i) in SPECIAL_TOKENS else len(tok.enc.decode_single_token_bytes(i))
        assert token_bytes[i] == expected

    (folder / "tokenizer.json").write_text('{"pattern": "x"}')
    with pytest.raises(ValueError, match="corrupt tokenizer file"):
        RustBPETokenizer.from_directory(str(folder))
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        RustBPETokenizer.from_directory(str(tmp_path / "nowhere"))


def test_pretrained_reference_tokenizers(shared_mirror, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", shared_mirror)
    gpt2 = RustBPETokenizer.from_pretrained("gpt2")
    assert gpt2.encode("Hello world") == [15496, 995] and gpt2.get_vocab_size() == 50257
    gpt4 = RustBPETokenizer.from_pretrained("cl100k_base")
    assert gpt4.encode("hello world") == [15339, 1917] and gpt4.get_vocab_size() == 100277
    with pytest.raises(ValueError, match="unknown pretrained"):
        RustBPETokenizer.from_pretrained("llama")


def test_tok_train_and_tok_eval(base_dir, shared_mirror):
    env = {"NANOCHAT_MIRROR": shared_mirror}
    r = run_module("scripts.tok_train", "--max_chars=1000000", env=env)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: found 0 pretraining shard(s)")

    assert run_module("nanochat.dataset", "-n", "3", env=env).returncode == 0
    r = run_module("scripts.tok_train", "--max_chars=2000000", "--vocab_size", "1024", env=env)
    assert r.returncode == 0, r.stderr
    assert "config: {'max_chars': 2000000, 'doc_cap': 10000, 'vocab_size': 1024}" in r.stdout
    assert re.search(r"trained on [\d,]+ characters in [\d.]+s", r.stdout) and "all the text" not in r.stdout
    tok = RustBPETokenizer.from_directory(str(base_dir / "tokenizer"))
    assert tok.get_vocab_size() == 1024
    assert "vocab_size: 1024" in (base_dir / "report" / "tokenizer-training.md").read_text()

    r = run_module("scripts.tok_eval", env=env)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "bytes/token" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["news", "code", "math", "science", "korean", "fwe-train", "fwe-val"]
    for row in rows:  # bytes / tokens = ratio, for each of the three tokenizers
        cells = [c.strip() for c in row.strip("|").split("|")]
        nbytes = int(cells[1])
        for tokens, ratio in zip(cells[2::2], cells[3::2]):
            assert abs(nbytes / int(tokens) - float(ratio)) < 0.006
    assert (base_dir / "report" / "tokenizer-evaluation.md").exists()

    # More than the shards hold: it says so, and the progress bar ends full at what there was.
    r = run_module("scripts.tok_train", "--max_chars=1000000000", "--vocab_size", "1024", env=env)
    assert r.returncode == 0, r.stderr
    chars = re.search(r"trained on ([\d,]+) characters", r.stdout).group(1)
    assert "that is all the text of the local train shards (--max_chars=1,000,000,000 asked for more)" in r.stdout
    assert 2_000_000 < int(chars.replace(",", "")) < 1_000_000_000
    last_bar = re.split(r"[\r\n]", r.stderr.strip())[-1]
    assert "100%" in last_bar, last_bar


def test_bad_vocab_size():
    with pytest.raises(ValueError, match="at least 265"):
        RustBPETokenizer.train_from_iterator(iter(["x"]), 264)


def test_visualize_tokenization_shows_every_token(tok):
    ids, mask = tok.render_conversation({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    shown = tok.visualize_tokenization(ids, mask, with_token_id=True)
    plain = re.sub(r"\033\[[0-9;]*m", "", shown)
    assert plain == "".join(f"{tok.id_to_token(i)}[{i}]" for i in ids)
    assert shown.count("\033[42m") == sum(mask)  # learned tokens are highlighted
