"""
Generation speed, ours against a peer on the same model size, prompts and sampling settings:

- decode throughput (new tokens/s over all rows, prefill included) at batch 1, 8, 32 and 128, for
  one prompt sampled B times ("same") and for B prompts of lengths 32..256 ("mixed");
- the wall time of one chat_rl rollout phase: 16 problems x 16 samples x 128 new tokens;
- the KV cache against recomputing the whole sequence every step (GPT.generate) at prompt 1024;
- on CUDA, decode at batch 1 and 128 with and without CUDA graphs, and the share of the GPU's
  memory bandwidth that reading the weights and the KV cache every step amounts to.

The peer is HuggingFace transformers' generate() with a static cache on a Llama-style model of the
same size (same width, depth, heads and vocab; SwiGLU sized to the same parameter count), prompts
left-padded. Both models are randomly initialised (speed does not depend on the weights); ours
never stops early (its special tokens' logits are zeroed, far below the top k), the peer has no
end token, so every row generates exactly the tokens asked for.

    python dev/bench/inference.py [--depth 4] [--device_type cpu]     # the peer needs `.[bench]`
    python dev/bench/inference.py --depth 20 --rl_new_tokens 256 --no_peer   # a GPU, the speedrun's RL shape

Every number is the best of --repeats runs (this kind of machine is noisy).
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanochat.common import autodetect_device_type, make_parser  # noqa: E402
from nanochat.engine import Engine  # noqa: E402
from nanochat.gpt import GPT, config_for_depth  # noqa: E402
from nanochat.tokenizer import RustBPETokenizer  # noqa: E402

BATCHES = (1, 8, 32, 128)
TOP_K, TEMPERATURE = 50, 1.0


def build(depth, device, seq_len=2048):
    g = torch.Generator().manual_seed(0)  # random lowercase words: plenty of pairs to merge
    letters = (torch.randint(0, 26, (400_000,), generator=g) + ord("a")).tolist()
    text = "".join(chr(c) if i % 7 else " " for i, c in enumerate(letters))
    tok = RustBPETokenizer.train_from_iterator(iter([text]), 4096)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config_for_depth(depth, tok.get_vocab_size(), seq_len))
    model.to_empty(device=device)
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.5)
        model.lm_head.weight[tok.get_vocab_size() - len(tok.get_special_tokens()):] = 0  # never a stop or a tool call
    return model.eval().to(model.compute_dtype), tok  # weights in the compute dtype, as load_model gives them


def prompts(tok, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    ordinary = tok.get_vocab_size() - len(tok.get_special_tokens())
    return [torch.randint(0, ordinary, (n,), generator=g).tolist() for n in lengths]


def mixed_lengths(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(32, 257, (count,), generator=g).tolist()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """The best wall time of `repeats` runs."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.time()
        fn()
        sync(device)
        best = min(best, time.time() - t0)
    return best


def ours(engine, batch, num_samples, new_tokens):
    engine.generate_many(batch, num_samples=num_samples, max_tokens=new_tokens, temperature=TEMPERATURE, top_k=TOP_K)


class Peer:
    """transformers' Llama of our model's size, generating with a static KV cache."""

    def __init__(self, model, device):
        from transformers import LlamaConfig, LlamaForCausalLM

        c = model.config
        config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=8 * c.n_embd // 3,
                             num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                             max_position_embeddings=c.sequence_len, tie_word_embeddings=False)
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(config).to(device=device, dtype=model.compute_dtype).eval()
        self.device = device

    @torch.inference_mode()
    def __call__(self, batch, num_samples, new_tokens):
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for r, p in enumerate(batch):  # left padding, as generate() expects
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        self.model.generate(ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=True, top_k=TOP_K, temperature=TEMPERATURE,
                            num_return_sequences=num_samples, cache_implementation="static", pad_token_id=0)


def main():
    parser = make_parser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=64, help="new tokens per row in the batch table")
    parser.add_argument("--device_type", default=None)
    parser.add_argument("--no_peer", action="store_true", help="skip transformers")
    parser.add_argument("--rl_new_tokens", type=int, default=128, help="new tokens per row in the RL rollout phase")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device_type or autodetect_device_type())
    model, tok = build(args.depth, device)
    engine = Engine(model, tok)
    try:
        peer = None if args.no_peer else Peer(model, device)
    except ImportError:
        print("(transformers is not installed: pip install -e '.[bench]'; the peer's columns are left out)")
        peer = None
    print(f"depth {args.depth}, vocab {tok.get_vocab_size()}, {device}, {model.compute_dtype}, "
          f"{torch.get_num_threads()} threads, top-k {TOP_K} sampling")
    contenders = [("ours", lambda b, n, t: ours(engine, b, n, t))] + ([("transformers", peer)] if peer else [])
    ours(engine, prompts(tok, [16], 99), 2, 4)  # warm up
    if peer:
        peer(prompts(tok, [16], 99), 2, 4)

    print(f"\n| batch | prompts | {' | '.join(f'{name} tok/s' for name, _ in contenders)} |{' ours / peer |' if peer else ''}")
    print("|---|---|" + "---|" * len(contenders) + ("---|" if peer else ""))
    for batch in BATCHES:
        for kind, lengths, samples in (("same", [128], batch), ("mixed", mixed_lengths(batch), 1)):
            rates = [batch * args.new_tokens / timed(lambda: run(prompts(tok, lengths, batch), samples, args.new_tokens),
                                                    device, args.repeats) for _, run in contenders]
            ratio = f" {rates[0] / rates[1]:.2f}x |" if peer else ""
            print(f"| {batch} | {kind} | {' | '.join(f'{r:,.0f}' for r in rates)} |{ratio}")

    rl = prompts(tok, mixed_lengths(16, seed=1), 16)
    times = [timed(lambda: run(rl, 16, args.rl_new_tokens), device, args.repeats) for _, run in contenders]
    print(f"\nRL rollout phase (16 problems x 16 samples x {args.rl_new_tokens} new tokens): "
          + ", ".join(f"{name} {t:.2f} s" for (name, _), t in zip(contenders, times))
          + (f"; ours {times[1] / times[0]:.2f}x faster" if peer else ""))

    ids = prompts(tok, [1024], 3)[0]
    cached = args.new_tokens / timed(lambda: ours(engine, [ids], 1, args.new_tokens), device, args.repeats)
    uncached = args.new_tokens / timed(lambda: list(model.generate(ids, args.new_tokens, temperature=TEMPERATURE,
                                                                    top_k=TOP_K)), device, 1)
    print(f"prompt 1024, one row: KV cache {cached:,.1f} tok/s, no cache {uncached:,.1f} tok/s ({cached / uncached:.1f}x)")
    if device.type == "cuda":
        graphs_table(model, tok, device, args)


# Peak memory bandwidth by GPU name (bytes/s), for the bandwidth utilisation of decoding.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12, "4090": 1.0e12}


def graphs_table(model, tok, device, args):
    """Decode with and without CUDA graphs at batch 1 and 128 (one 128-token prompt). A step reads
    every weight, the prompt's keys and values and each row's so far: those bytes over the step
    time, against the GPU's peak, are the bandwidth utilisation."""
    name = torch.cuda.get_device_name(device)
    peak = next((b for key, b in PEAK_BANDWIDTH.items() if key in name), None)
    c, itemsize = model.config, torch.finfo(model.compute_dtype).bits // 8
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"\n{name}: | batch | CUDA graphs | tok/s | step ms | bandwidth used |\n|---|---|---|---|---|")
    for batch in (1, 128):
        for graphs in (False, True):
            engine = Engine(model, tok, cuda_graphs=graphs)
            ids = prompts(tok, [128], 7)
            ours(engine, ids, batch, 8)  # warm up (and capture)
            dt = timed(lambda: ours(engine, ids, batch, args.new_tokens), device, args.repeats) / args.new_tokens
            # keys and values read per step: the shared prompt's once, each row's reply so far (on average)
            kv = 2 * c.n_layer * c.n_kv_head * (c.n_embd // c.n_head) * itemsize * (128 + batch * args.new_tokens / 2)
            used = f"{100 * (weights + kv) / dt / peak:.0f}%" if peak else "n/a"
            print(f"| {batch} | {'yes' if graphs else 'no'} | {batch / dt:,.0f} | {dt * 1000:.2f} | {used} |")


if __name__ == "__main__":
    main()
