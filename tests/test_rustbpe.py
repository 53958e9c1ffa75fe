"""rustbpe: merges equal to a naive reference BPE and to the PyPI rustbpe; tiktoken agrees with it."""

import json
import os

import pyarrow.parquet as pq
import pytest
import regex
import rustbpe
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import missing
from peers import PEERS_DIR, load_pypi_rustbpe
from nanochat.tokenizer import SPLIT_PATTERN

PYPI_RUSTBPE = load_pypi_rustbpe()


def pypi_rustbpe():
    """The peer the merges must equal (after the checks that need no peer have run)."""
    return PYPI_RUSTBPE or missing("the PyPI rustbpe peer", f"pip install --target {PEERS_DIR}/rustbpe rustbpe==0.1.0")


def mirror_docs(shared_mirror, shard=0):
    path = os.path.join(shared_mirror, "huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main", f"shard_{shard:05d}.parquet")
    return pq.read_table(path).column("text").to_pylist()


def naive_ranks(texts, vocab_size, pattern):
    """Textbook BPE: recount all pairs every step; best = highest count, then smallest pair."""
    counts = {}
    for text in texts:
        for chunk in regex.findall(pattern, text):
            counts[chunk] = counts.get(chunk, 0) + 1
    words = [(list(chunk.encode("utf-8")), n) for chunk, n in counts.items()]
    token_bytes = [bytes([i]) for i in range(256)]
    while len(token_bytes) < vocab_size:
        pairs = {}
        for ids, n in words:
            for pair in zip(ids, ids[1:]):
                pairs[pair] = pairs.get(pair, 0) + n
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        new = len(token_bytes)
        token_bytes.append(token_bytes[a] + token_bytes[b])
        for ids, _ in words:
            i = 0
            while i < len(ids) - 1:
                if ids[i] == a and ids[i + 1] == b:
                    ids[i : i + 2] = [new]
                i += 1
    return [(b, i) for i, b in enumerate(token_bytes)]


def train(texts, vocab_size, module=rustbpe, **kwargs):
    tok = module.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, pattern=SPLIT_PATTERN, **kwargs)
    return tok


CJK = "東京は日本の首都です。人口は約1400万人で、世界有数の大都市だ。北京是中国的首都。서울은 한국의 수도입니다。"
CORPORA = {
    "prose": lambda m: mirror_docs(m)[:40],
    "code": lambda m: [open(json.__file__).read(), open(os.__file__).read()[:60000]],
    "cjk": lambda m: [CJK * 3, CJK[::-1], "漢字かな交じり文" * 20],
    "emoji_and_marks": lambda m: ["👍🏽 👨‍👩‍👧 🇫🇷 e\u0301 a\u0308\u0301 ñ n\u0303 😀😀😀 " * 30, "Zalgo: Z\u0351\u0352a\u0353l\u0354g\u0355o" * 10],
    "mixed_scripts": lambda m: ["Hello мир κόσμε नमस्ते مرحبا שלום こんにちは 123 abc " * 25],
    "whitespace": lambda m: [" " * 500 + "x" + "\n" * 300 + "\t \r\n" * 100 + "  end   ", "a  b   c    d" * 50],
    "digits": lambda m: ["1234567890" * 100, "3.14159 2.71828 1e10 0xFF 007 " * 50, "٣٤٥ ²³ Ⅻ" * 20],
    "empty_docs": lambda m: ["", "", "a", "", "ab ab ab", ""],
}


@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_merges_equal_naive_reference_and_pypi(corpus, shared_mirror):
    texts = CORPORA[corpus](shared_mirror)
    ours = train(texts, 256 + 150).get_mergeable_ranks()
    assert ours == naive_ranks(texts, 256 + 150, SPLIT_PATTERN)
    assert ours == train(texts, 256 + 150, pypi_rustbpe()).get_mergeable_ranks()


def test_one_megabyte_document(shared_mirror):
    doc = ""
    for text in mirror_docs(shared_mirror):
        doc += text
        if len(doc) > 1_000_000:
            break
    ours = train([doc], 256 + 40).get_mergeable_ranks()
    assert ours == naive_ranks([doc], 256 + 40, SPLIT_PATTERN)
    big = train([doc] * 3, 256 + 2000)
    assert big.get_mergeable_ranks() == train([doc] * 3, 256 + 2000, pypi_rustbpe()).get_mergeable_ranks()


def test_buffering_does_not_change_the_result(shared_mirror):
    texts = mirror_docs(shared_mirror)[:50]
    reference = train(texts, 1000).get_mergeable_ranks()
    for buffer_size in (1, 7, 10_000):
        assert train(texts, 1000, buffer_size=buffer_size).get_mergeable_ranks() == reference


@pytest.fixture(scope="module")
def trained(shared_mirror):
    """rustbpe trained on one real shard, and tiktoken built from its exported ranks."""
    tok = train(mirror_docs(shared_mirror, 0), 4096)
    enc = tiktoken.Encoding("test", pat_str=tok.get_pattern(), mergeable_ranks=dict(tok.get_mergeable_ranks()), special_tokens={})
    return tok, enc


def test_tiktoken_encodes_exactly_like_rustbpe(trained, shared_mirror):
    tok, enc = trained
    held_out = mirror_docs(shared_mirror, 15)[:200]
    expected = [enc.encode_ordinary(t) for t in held_out]
    assert [tok.encode(t) for t in held_out] == expected
    assert tok.batch_encode(held_out) == expected


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_round_trips_and_matches_tiktoken(trained, text):
    tok, enc = trained
    ids = tok.encode(text)
    ranks = {i: b for b, i in tok.get_mergeable_ranks()}
    assert b"".join(ranks[i] for i in ids) == text.encode("utf-8", errors="surrogatepass")
    if not any(0xD800 <= ord(c) <= 0xDFFF for c in text):  # tiktoken refuses lone surrogates
        assert ids == enc.encode_ordinary(text)


def test_bad_input():
    tok = rustbpe.Tokenizer()
    with pytest.raises(ValueError, match="at least 256"):
        tok.train_from_iterator(iter(["abc"]), 255)
    with pytest.raises(ValueError, match="invalid split pattern"):
        tok.train_from_iterator(iter(["abc"]), 300, pattern="(unclosed")
    with pytest.raises(TypeError, match="expected str, got int"):
        tok.train_from_iterator(iter(["abc", 42]), 300)
    with pytest.raises(TypeError, match="expected str, got bytes"):
        tok.encode(b"abc")


def test_empty_corpus_gives_the_byte_tokenizer():
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter([]), 1000)
    assert tok.get_mergeable_ranks() == [(bytes([i]), i) for i in range(256)]
    assert tok.encode("hi") == [ord("h"), ord("i")]
    assert tok.get_pattern() == rustbpe.GPT4_PATTERN
