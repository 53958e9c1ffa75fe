"""The tokenizing loader on real shards: disjoint ranks, BOS-aligned rows, exact resume."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from nanochat.dataloader import _row_groups, _split_paths, cropped_fraction, tokenizing_distributed_data_loader
from nanochat.dataset import list_parquet_files
from nanochat.tokenizer import get_tokenizer


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_ranks_read_disjoint_row_groups_that_cover_the_split(pretrain_env):
    paths = _split_paths("train")
    per_rank = []
    total = sum(pq.ParquetFile(p).num_row_groups for p in paths)
    for rank in range(3):
        stream = _row_groups(paths, rank, 3, None)
        positions = []
        while len(positions) < 1000:
            position, _, _ = next(stream)
            if position[0] > 0:  # one epoch
                break
            positions.append(tuple(position[1:]))
        per_rank.append(set(positions))
    assert not (per_rank[0] & per_rank[1]) and not (per_rank[1] & per_rank[2]) and not (per_rank[0] & per_rank[2])
    assert len(per_rank[0] | per_rank[1] | per_rank[2]) == total


def test_loader_ranks_buffer_only_their_documents(pretrain_env):
    tok = get_tokenizer()
    for rank in (0, 1):
        _, _, state = next(tokenizing_distributed_data_loader(tok, 2, 64, "train", rank=rank, world_size=2, buffer_docs=100))
        assert state["buffer"] and all(rg % 2 == rank for _, _, rg, _ in state["buffer"])


def documents(tok):
    texts = [t for p in list_parquet_files()[:-1] for t in pq.read_table(p).column("text").to_pylist()]
    return tok.encode(texts, prepend=tok.get_bos_token_id())


def test_bestfit_rows_are_whole_documents_and_one_cropped_tail(pretrain_env):
    tok = get_tokenizer()
    bos = tok.get_bos_token_id()
    docs = documents(tok)
    by_prefix = {}
    for d in docs:
        by_prefix.setdefault(tuple(d[:8]), []).append(d)
    loader = tokenizing_distributed_data_loader(tok, 4, 256, "train", rank=0, world_size=1, buffer_docs=200)
    for x, y, state in take(loader, 5):
        assert x.shape == y.shape == (4, 256)
        assert (x[:, 1:] == y[:, :-1]).all()  # targets are the inputs shifted by one
        assert (x[:, 0] == bos).all()
        for row in np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1):
            starts = list(np.flatnonzero(row == bos)) + [len(row)]
            pieces = [row[a:b].tolist() for a, b in zip(starts, starts[1:])]
            for i, piece in enumerate(pieces):
                candidates = by_prefix.get(tuple(piece[:8])) if len(piece) >= 8 else docs
                if i < len(pieces) - 1:
                    assert piece in candidates  # every document but the last is whole
                else:
                    assert any(piece == d[: len(piece)] for d in candidates)  # the last may be cropped
    assert 0 < cropped_fraction(state) < 1


def test_bestfit_rows_start_with_documents_in_reading_order(pretrain_env):
    """Rows start with the document that waited longest, not the longest one: with rows shorter than
    most documents, longest-first would start every row with a long one and hold the short ones back."""
    tok = get_tokenizer()
    bos = tok.get_bos_token_id()
    docs = documents(tok)
    loader = tokenizing_distributed_data_loader(tok, 4, 256, "train", rank=0, world_size=1, buffer_docs=200)
    rows = [row for x, _, _ in take(loader, 10) for row in x.numpy().tolist()]
    assert sum(len(docs[i]) > 257 for i in range(len(rows))) > len(rows) // 2  # most documents are longer than a row
    last = -1
    for row in rows:
        end = row.index(bos, 1) if bos in row[1:] else len(row)
        first = row[:end]  # the row's first document, cropped or whole
        last = next((i for i in range(last + 1, len(docs)) if docs[i][: len(first)] == first), None)
        assert last is not None, "a row starts with a document read before the previous row's"
    assert any(bos in row[1:] for row in rows)  # and short documents share rows from the start


@pytest.mark.parametrize("packing", ["bestfit", "bestfit_keep", "concat"])
def test_resume_state_reproduces_the_next_batches(pretrain_env, packing):
    tok = get_tokenizer()
    kwargs = dict(rank=1, world_size=2, packing=packing, buffer_docs=50, tokenizer_batch=64)
    straight = take(tokenizing_distributed_data_loader(tok, 3, 128, "train", **kwargs), 12)
    resumed = take(tokenizing_distributed_data_loader(tok, 3, 128, "train", resume_state=straight[6][2], **kwargs), 5)
    for (x1, y1, s1), (x2, y2, s2) in zip(straight[7:], resumed):
        assert (x1 == x2).all() and (y1 == y2).all() and s1 == s2


def test_concat_packing_drops_nothing(pretrain_env):
    tok = get_tokenizer()
    x, y, state = next(tokenizing_distributed_data_loader(tok, 2, 128, "train", rank=0, world_size=1, packing="concat"))
    rows = np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1)  # rows of T + 1 tokens
    row = rows.reshape(-1)  # back to back: the stream of documents
    first_doc = documents(tok)[0]
    assert row[: len(first_doc)].tolist() == first_doc[: len(row)]
    assert cropped_fraction(state) == 0


def test_bestfit_keep_drops_nothing(pretrain_env):
    """What best-fit would crop goes back to the buffer: the tokens emitted plus those still in the
    buffer are exactly the tokens of the documents read, and some rows start mid-document."""
    tok = get_tokenizer()
    bos = tok.get_bos_token_id()
    loader = tokenizing_distributed_data_loader(tok, 4, 128, "train", rank=0, world_size=1, packing="bestfit_keep",
                                                buffer_docs=20, tokenizer_batch=20)
    batches = take(loader, 30)
    state = batches[-1][2]
    rows = np.concatenate([np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1) for x, y, _ in batches])
    assert cropped_fraction(state) == 0 and (rows[:, 0] != bos).any()
    epoch, shard, rg = state["next_position"]
    assert epoch == 0
    read = {}  # (shard, row group) -> its documents, for every row group read so far
    for s, path in enumerate(list_parquet_files()[: shard + 1]):
        file = pq.ParquetFile(path)
        for g in range(file.metadata.num_row_groups if s < shard else rg):
            read[s, g] = tok.encode(file.read_row_group(g, columns=["text"]).column("text").to_pylist(), prepend=bos)
    left = [read[s, g][doc][off:] for (_, s, g, doc), off in zip(state["buffer"], state["offsets"])]
    vocab = tok.get_vocab_size()
    count = lambda seqs: np.bincount(np.concatenate([np.asarray(t, dtype=np.int64) for t in seqs]), minlength=vocab)  # noqa: E731
    assert (count(list(rows)) + count(left or [[]]) == count([d for docs in read.values() for d in docs])).all()


def test_no_shards_is_a_clear_error(base_dir):
    with pytest.raises(FileNotFoundError, match="python -m nanochat.dataset"):
        tokenizing_distributed_data_loader(object(), 2, 16, "train", rank=0, world_size=1)


def test_a_rank_without_data_is_a_clear_error(pretrain_env, tmp_path, monkeypatch):
    import shutil

    base = tmp_path / "small"
    (base / "base_data").mkdir(parents=True)
    shutil.copytree(pretrain_env / "tokenizer", base / "tokenizer")
    for name in ("shard_00000.parquet", "shard_00001.parquet"):  # a val shard of one row group
        table = pq.read_table(pretrain_env / "base_data" / name).slice(0, 50)
        pq.write_table(table, base / "base_data" / name, row_group_size=64)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    with pytest.raises(ValueError, match="rank 1 has no val data"):
        tokenizing_distributed_data_loader(get_tokenizer(), 2, 16, "val", rank=1, world_size=2)
