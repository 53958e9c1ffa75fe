"""
The pretraining data loader: parquet row groups -> tokenized documents -> packed (B, T) batches.

Each rank reads its own row groups (strided by rank and world size), tokenizes them in threads
with tiktoken, prepends BOS to every document, and packs documents into rows of T + 1 tokens:

- "bestfit" (default): every row starts at a document start. Documents wait in a buffer sorted by
  length; each row starts with the one that has waited longest (so every document gets its turn,
  in the order read), then takes the longest that still fits, again and again, and when none fits
  fills the rest with the start of the shortest one (the remainder is cropped: dropped). A document
  longer than a row only ever starts one, where cropping it wastes least.
- "bestfit_keep": the same, but what would be cropped goes back into the buffer as a piece of its
  own (nothing is dropped; a row may then start mid-document, as whole-document evaluation's
  windows do).
- "concat": documents back to back, split wherever a row ends (nothing is dropped).

Every batch comes with a `state`: where reading continues and which documents sit in the buffer.
A loader started with that state yields exactly the batches the old one would have yielded next.
"""

import bisect
import logging

import numpy as np
import pyarrow.parquet as pq
import torch

from nanochat.dataset import list_parquet_files

logger = logging.getLogger(__name__)


def _read_texts(path, row_group):
    return pq.ParquetFile(path).read_row_group(row_group, columns=["text"]).column("text").to_pylist()


def _split_paths(split):
    paths = list_parquet_files()
    if len(paths) < 2:
        raise FileNotFoundError(f"found {len(paths)} pretraining shard(s), need at least 2; run `python -m nanochat.dataset -n 8`")
    return paths[:-1] if split == "train" else paths[-1:]


def _row_groups(paths, rank, world_size, start, log_level=logging.INFO):
    """Yield (position, following, texts) for this rank's row groups, epoch after epoch, forever.
    position = [epoch, shard, row group] read; following = where to start to continue after it."""
    epoch, shard, rg = start or (0, 0, rank)
    while True:
        for s in range(shard, len(paths)):
            n = pq.ParquetFile(paths[s]).metadata.num_row_groups
            for g in range(rg if s == shard else rank, n, world_size):
                if g + world_size < n:
                    following = [epoch, s, g + world_size]
                else:
                    following = [epoch, s + 1, rank] if s + 1 < len(paths) else [epoch + 1, 0, rank]
                yield [epoch, s, g], following, _read_texts(paths[s], g)
        epoch, shard, rg = epoch + 1, 0, rank
        logger.log(log_level, "data loader: starting epoch %d of %d shard(s)", epoch, len(paths))


PACKINGS = ("bestfit", "bestfit_keep", "concat")


def tokenizing_distributed_data_loader(tokenizer, B, T, split, device="cpu", resume_state=None, packing="bestfit",
                                       buffer_docs=1000, tokenizer_threads=4, tokenizer_batch=128, rank=None, world_size=None):
    """An iterator of (inputs, targets, state), forever: (B, T) int64 tensors on `device`, targets =
    inputs shifted by one, and the state to resume from after this batch. Missing data is an
    error here, at creation, not at the first batch."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, not {packing!r}")
    if rank is None or world_size is None:
        from nanochat.common import get_dist_info

        _, rank, _, world_size = get_dist_info()
    paths = _split_paths(split)
    counts = [pq.ParquetFile(p).metadata.num_row_groups for p in paths]
    if all(n <= rank for n in counts):  # this rank's stride would find nothing, forever
        raise ValueError(f"rank {rank} has no {split} data: its shard(s) hold at most {max(counts)} row group(s) each, "
                         f"fewer than the {world_size} ranks; download more shards with `python -m nanochat.dataset`")
    return _batches(tokenizer, B, T, split, paths, device, resume_state or {}, packing, buffer_docs,
                    tokenizer_threads, tokenizer_batch, rank, world_size)


def _batches(tokenizer, B, T, split, paths, device, state, packing, buffer_docs, tokenizer_threads, tokenizer_batch, rank, world_size):
    bos = tokenizer.get_bos_token_id()

    # Best-fit never uses more than the first T + 1 tokens of a document (a longer one only ever
    # fills the rest of one row), so texts are cut before tokenizing, far past where those tokens
    # end (4-5 characters per token is typical; 8 leaves a wide margin), so little work is spent
    # on what would be cropped anyway.
    max_chars = 8 * (T + 1) if packing == "bestfit" else None

    def tokenize(texts):
        texts = [t[:max_chars] for t in texts]
        return [np.array(ids, dtype=np.int32) for ids in tokenizer.encode(texts, prepend=bos, num_threads=tokenizer_threads)]

    # The buffer holds (tokens left, source, tokens, offset); source = [epoch, shard, row group, doc].
    # For best-fit it is kept sorted by tokens left. On resume it is rebuilt from the sources.
    buffer, cache = [], {}
    for (epoch, shard, rg, doc), off in zip(state.get("buffer", []), state.get("offsets", [])):
        if (shard, rg) not in cache:
            cache[(shard, rg)] = tokenize(_read_texts(paths[shard], rg))
        tokens = cache[(shard, rg)][doc]
        buffer.append((len(tokens) - off, [epoch, shard, rg, doc], tokens, off))
    del cache
    # the small val split wraps around often during evaluation: not news
    stream = _row_groups(paths, rank, world_size, state.get("next_position"), logging.INFO if split == "train" else logging.DEBUG)
    next_position = state.get("next_position")
    stats = dict(state.get("stats", {"used": 0, "cropped": 0}))
    use_cuda = torch.device(device).type == "cuda"
    row_len = T + 1

    def refill():
        nonlocal next_position
        if len(buffer) < buffer_docs:  # top up one tokenizer batch at a time: a quick start
            sources, texts = [], []
            while len(texts) < tokenizer_batch:  # tokenize many documents per call: threads need work
                position, next_position, row_group = next(stream)
                sources += [[*position, doc] for doc in range(len(row_group))]
                texts += row_group
            for src, tokens in zip(sources, tokenize(texts)):
                item = (len(tokens), src, tokens, 0)
                if packing != "concat":
                    bisect.insort(buffer, item, key=lambda x: x[0])
                else:
                    buffer.append(item)

    while True:
        batch = np.empty((B, row_len), dtype=np.int64)
        for b in range(B):
            filled = 0
            while filled < row_len:
                refill()
                room = row_len - filled
                if packing != "concat":
                    # A row starts with the document read first (sources sort in reading order). Starting
                    # rows with the longest instead starves the short ones while long ones keep coming:
                    # at T=512, where 84% of documents are longer than a row, for the first ~5000 rows.
                    if room == row_len:
                        i = min(range(len(buffer)), key=lambda j: buffer[j][1])
                    else:
                        i = max(bisect.bisect_right(buffer, room, key=lambda x: x[0]) - 1, 0)  # none fits: the shortest, cropped
                    length, src, tokens, off = buffer.pop(i)
                else:
                    length, src, tokens, off = buffer.pop(0)
                take = min(length, room)
                batch[b, filled : filled + take] = tokens[off : off + take]
                filled += take
                if take < length and packing == "concat":
                    buffer.insert(0, (length - take, src, tokens, off + take))  # continues in the next row
                elif take < length and packing == "bestfit_keep":
                    bisect.insort(buffer, (length - take, src, tokens, off + take), key=lambda x: x[0])
                elif take < length:
                    stats["cropped"] += length - take
                stats["used"] += take
        state = {
            "next_position": next_position,
            "buffer": [src for _, src, _, _ in buffer],
            "offsets": [off for _, _, _, off in buffer],
            "stats": dict(stats),
        }
        # Two separate tensors: a caller that masks targets must not change the inputs.
        inputs, targets = (torch.from_numpy(np.ascontiguousarray(a)) for a in (batch[:, :-1], batch[:, 1:]))
        if use_cuda:
            inputs, targets = (t.pin_memory().to(device, non_blocking=True) for t in (inputs, targets))
        yield inputs, targets, state


def cropped_fraction(state):
    """Fraction of the tokens read so far that best-fit packing dropped."""
    s = state["stats"]
    return s["cropped"] / max(1, s["cropped"] + s["used"])
