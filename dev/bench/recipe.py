"""
The pretraining recipe's ablation bench: train several configurations of base_train on the same
data for the same number of tokens and print their whole-document val bits per byte and median
step time side by side, one row per configuration and seed.

Each row is a real `python -m scripts.base_train` run with its own flags (a configuration is a
list of flags on top of base_train's defaults), in a bench folder of its own: the mirror's (or
the web's) first 8 pretraining shards (0-6 train, 7 val) and a tokenizer trained on up to 100M
characters of them. Validation is the same for every row (loss_eval: whole documents in order),
so rows with different packing or context compare; beside it, the val rows packed best-fit
(mostly the first tokens of each document, which prompts resemble). Finished rows are kept in a JSON-lines file
and not rerun (--rerun to redo some), so the bench can be run a piece at a time.

    python dev/bench/recipe.py                                  # the CPU preset, every configuration
    python dev/bench/recipe.py --depths 4 --steps 200 --configs baseline new --seeds 1 2
    python dev/bench/recipe.py --list                           # the configurations and their flags
"""

import json
import os
import re
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from nanochat.common import make_parser  # noqa: E402

# The recipe before issue 14, pinned by flags so that "baseline" stays the same row whatever the
# defaults become. "new" is base_train's defaults. Every other configuration is the baseline (or a
# later round's recipe, pinned likewise) plus one change, so each default change has a row of its own.
BASELINE = ["--warmdown_ratio=0.2", "--final_lr_frac=0.0", "--weight_decay=0.0", "--matrix_weight_decay=0.0",
            "--newton_schulz=classic", "--equilibrate_rows=0", "--normuon_beta2=0.0", "--value_embeds=0", "--residual_scalars=0", "--softcap=15",
            "--rotary_base=10000", "--matrix_lr=0.02", "--embedding_lr=0.2", "--unembedding_lr=0.004",
            "--momentum_warmup=300", "--momentum_cooldown=0.0", "--warmup_ratio=0.0", "--init_scale=1", "--window=0", "--window_stages=1", "--attn_scale=0", "--attn_gate=0",
            "--smear=0", "--key_offset=0", "--head_dim=128", "--packing=bestfit", "--doc_mask=0",
            "--canon=0", "--tie_embedding=0"]
# The recipe of the fourth round (value embeddings, a longer warmdown, sliding windows), pinned the
# same way: the fifth round's changes are measured against it.
VWW = BASELINE + ["--value_embeds=1", "--warmdown_ratio=0.5", "--window=0.25"]
# The fifth round's (attention gates, windows of an eighth), against which the sixth round's are measured.
ROUND5 = VWW + ["--attn_gate=1", "--window=0.125"]
# The sixth round's (smear), against which the seventh round's are measured.
ROUND6 = ROUND5 + ["--smear=1"]
# The eighth round's (Muon's momentum cooldown), against which the ninth round's are measured.
ROUND8 = ROUND6 + ["--momentum_cooldown=0.5"]
# The tenth round's (the key offset), against which the eleventh round's are measured.
ROUND10 = ROUND8 + ["--key_offset=1"]
# The twelfth round's: the same flags, but rows start with the document read first (nanochat.dataloader);
# every row before it was measured with longest-first rows, which at this T trained on long documents only.
ROUND12 = ROUND10
# The batch rule's rows: twice the batch for half the steps (the same tokens), with the LRs as they
# are and scaled by sqrt(2) as base_train's batch rule scales them.
DOUBLE_BATCH = ["--total_batch_size={double_batch}", "--num_iterations={half_steps}"]
SQRT2_LRS = ["--matrix_lr=0.0283", "--embedding_lr=0.283", "--unembedding_lr=0.00566", "--scalar_lr=0.0283"]
# And half the batch for twice the steps, with Muon's momentum warmup (counted in steps) over the same tokens.
HALF_BATCH = ["--total_batch_size={half_batch}", "--num_iterations={double_steps}", "--device_batch_size=auto",
              "--momentum_warmup=600"]
CONFIGS = {
    "baseline": BASELINE,
    "new": [],
    # schedule and learning rates
    "warmdown_0.4": BASELINE + ["--warmdown_ratio=0.4"],
    "warmdown_0.5": BASELINE + ["--warmdown_ratio=0.5"],
    "matrix_lr_0.04": BASELINE + ["--matrix_lr=0.04"],
    "embedding_lr_0.4": BASELINE + ["--embedding_lr=0.4"],
    "unembedding_lr_0.008": BASELINE + ["--unembedding_lr=0.008"],
    "warmup_0.05": BASELINE + ["--warmup_ratio=0.05"],
    "final_lr_0.1": BASELINE + ["--final_lr_frac=0.1"],
    # the model
    "value_embeds": BASELINE + ["--value_embeds=1"],
    "residual_scalars": BASELINE + ["--residual_scalars=1"],
    "softcap_30": BASELINE + ["--softcap=30"],
    "window_0.25": BASELINE + ["--window=0.25"],  # 128 tokens of 512
    "rotary_base_100k": BASELINE + ["--rotary_base=100000"],
    "attn_scale_0.12": BASELINE + ["--attn_scale=0.12"],  # 1/sqrt(128) = 0.088 before
    "init_scale_0.5": BASELINE + ["--init_scale=0.5"],
    "attn_gate": BASELINE + ["--attn_gate=1"],
    # the data: what training rows hold
    "packing_bestfit_keep": BASELINE + ["--packing=bestfit_keep"],
    "packing_concat": BASELINE + ["--packing=concat"],
    # the optimizer
    "polar_express": BASELINE + ["--newton_schulz=polar"],
    "normuon": BASELINE + ["--normuon_beta2=0.95"],
    "matrix_wd_0.1": BASELINE + ["--matrix_weight_decay=0.1"],
    "matrix_wd_0.2": BASELINE + ["--matrix_weight_decay=0.2"],
    "embedding_wd_0.1": BASELINE + ["--weight_decay=0.1"],
    "embedding_wd_0.01": BASELINE + ["--weight_decay=0.01"],  # AdamW decays by lr x wd: 0.2 x 0.1 is 2% a step
    "momentum_warmup_50": BASELINE + ["--momentum_warmup=50"],
    "momentum_cooldown_0.5": BASELINE + ["--momentum_cooldown=0.5"],
    # the recipe before sliding windows became a default
    "values_warmdown": BASELINE + ["--value_embeds=1", "--warmdown_ratio=0.5"],
    # the recipe before the attention gate and the shorter window (the fourth round's defaults),
    # and changes on top of it
    "values_warmdown_window": VWW,
    "vww_init_0.5": VWW + ["--init_scale=0.5"],
    "vww_matrix_wd_0.2": VWW + ["--matrix_weight_decay=0.2"],  # the third round's lead
    "vww_attn_gate": VWW + ["--attn_gate=1"],
    "vww_window_0.0625": VWW + ["--window=0.0625"],  # 32 tokens of 512 (it has 0.25: 128)
    "vww_window_0.125": VWW + ["--window=0.125"],
    "vww_window_0.5": VWW + ["--window=0.5"],
    # the batch rule: twice the batch for half the steps (the same tokens)
    "vww_batch_x2": VWW + DOUBLE_BATCH,
    "vww_batch_x2_lr_sqrt2": VWW + DOUBLE_BATCH + SQRT2_LRS,
    # the fifth round's recipe, and changes on top of it
    "round5": ROUND5,
    "r5_smear": ROUND6,
    # the sixth round's recipe, and the optimizer's changes again on top of it (its seed spread is a
    # third of the baseline's, against which they were first measured)
    "round6": ROUND6,
    "r6_polar": ROUND6 + ["--newton_schulz=polar"],
    "r6_normuon": ROUND6 + ["--normuon_beta2=0.95"],
    "r6_matrix_wd_0.2": ROUND6 + ["--matrix_weight_decay=0.2"],
    # the schedule and the head's LR again, on today's recipe
    "r6_unembedding_lr_0.002": ROUND6 + ["--unembedding_lr=0.002"],  # 2x was much worse on the baseline
    "r6_warmdown_0.7": ROUND6 + ["--warmdown_ratio=0.7"],
    "r6_momentum_cooldown_0.5": ROUND8,  # Muon's momentum back to 0.85 over the warmdown
    # the eighth round's recipe (its rows copied from r6_momentum_cooldown_0.5's), and the LRs on top of it
    "round8": ROUND8,
    "r8_matrix_lr_0.03": ROUND8 + ["--matrix_lr=0.03"],  # a longer warmdown often moves the best peak LR up
    "r8_embedding_lr_0.3": ROUND8 + ["--embedding_lr=0.3"],
    "r8_grad_clip_0": ROUND8 + ["--grad_clip=0"],  # Muon's update is scale-free: clipping mostly damps AdamW's
    "r8_key_offset": ROUND10,
    # the tenth round's recipe (its rows copied from r8_key_offset's), and changes on top of it
    "round10": ROUND10,
    "r10_softcap_20": ROUND10 + ["--softcap=20"],  # nanochat's best cap at depth 24 (2026-03)
    "r10_head_dim_64": ROUND10 + ["--head_dim=64"],  # twice the heads, same parameters and FLOPs
    "r10_window_0.0625": ROUND10 + ["--window=0.0625"],  # does the key offset move the best window?
    # the twelfth round's recipe (its rows copied from the loader patch's, screen_fifo_start)
    "round12": ROUND12,
    "r12_doc_mask": ROUND12 + ["--doc_mask=1"],  # attention, smear and key offset stay inside documents
    "r12_canon": ROUND12 + ["--canon=1"],  # a causal depthwise conv over 4 positions before attention and the MLP
    "r12_tie_embedding": ROUND12 + ["--tie_embedding=1"],  # the lm_head's rows are the token embedding too
    "r12_init_scale_0.5": ROUND12 + ["--init_scale=0.5"],  # -0.010 over 400 steps at 2048-token rows, +0.001 over 800
    "r12_window_0.0625": ROUND12 + ["--window=0.0625"],  # 32 tokens of 512: do rows in reading order move the best window?
    "r12_window_0.25": ROUND12 + ["--window=0.25"],  # at 2048-token rows (--seq_len=2048 --rows=2): 512 tokens
    "r12_window_0.03125": ROUND12 + ["--window=0.03125"],  # 64 tokens of 2048: the preset's window in tokens
    "r12_residual_scalars": ROUND12 + ["--residual_scalars=1"],  # learned residual and x0 scalars on today's recipe
    "r12_muoneq_r": ROUND12 + ["--equilibrate_rows=1"],  # MuonEq-R: the momentum's rows at unit norm before Newton–Schulz
    # windows that grow over the run (after modded-nanogpt): a sixteenth's head start, then the longer window
    "r12_window_grow": ROUND12 + ["--window_stages=2"],  # 32 tokens for the first half, then 64
    "r12_window_grow_0.25": ROUND12 + ["--window_stages=3", "--window=0.25"],  # 32, 64, then 128 tokens, a third each
    "r12_window_grow_3": ROUND12 + ["--window_stages=3"],  # 16, 32, then 64 tokens: shorter still at first
    # the batch at this scale: half of it for twice the steps, the LRs scaled by 1/sqrt(2) as the batch rule does, or not
    "r12_batch_half": ROUND12 + HALF_BATCH + ["--matrix_lr=0.01414", "--embedding_lr=0.1414", "--unembedding_lr=0.00283",
                                              "--scalar_lr=0.01414"],
    "r12_batch_half_same_lrs": ROUND12 + HALF_BATCH,
}


def run(cmd, env, log_path):
    """Run a command with its output in a log; the log's text, or a one-line error naming it."""
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    text = open(log_path).read()
    if proc.returncode != 0:
        tail = text.strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"error: {' '.join(cmd[2:4])} failed ({tail[0]}); see {log_path}")
    return text


def prepare(env, args):
    """The bench's shards and tokenizer (once)."""
    base = env["NANOCHAT_BASE_DIR"]
    os.makedirs(os.path.join(base, "recipe_logs"), exist_ok=True)
    if not os.path.exists(os.path.join(base, "tokenizer", "tokenizer.json")):
        print(f"preparing {base}: 8 shards, a {args.vocab}-token tokenizer on up to {args.tok_chars:,} characters", flush=True)
        run([sys.executable, "-m", "nanochat.dataset", "-n", "8"], env, os.path.join(base, "recipe_logs", "data.log"))
        run([sys.executable, "-m", "scripts.tok_train", f"--max_chars={args.tok_chars}", f"--vocab_size={args.vocab}"],
            env, os.path.join(base, "recipe_logs", "tokenizer.log"))


def flags(name, steps, tokens):
    """A configuration's flags for a run of `steps` steps of `tokens` tokens."""
    return [flag.format(half_steps=steps // 2, double_batch=2 * tokens, double_steps=2 * steps, half_batch=tokens // 2)
            for flag in CONFIGS[name]]


def train(env, args, name, depth, steps, seed):
    """One base_train run; its val bpb and median step time (ms, steps after the 10th)."""
    base = env["NANOCHAT_BASE_DIR"]
    tokens = args.rows * args.seq_len
    cmd = [sys.executable, "-m", "scripts.base_train", f"--depth={depth}", f"--max_seq_len={args.seq_len}",
           f"--device_batch_size={args.rows}", f"--total_batch_size={tokens}", f"--num_iterations={steps}",
           f"--seed={seed}", "--eval_every=0", f"--eval_tokens={args.eval_tokens}", "--core_metric_every=-1",
           "--sample_every=-1", "--dry_run=1", "--eval_doc_starts=1", *flags(name, steps, tokens)]
    text = run(cmd, env, os.path.join(base, "recipe_logs", f"{name}_d{depth}_{steps}_T{args.seq_len}x{args.rows}_s{seed}.log"))
    bpb = float(re.findall(r"val bpb: ([0-9.]+)", text)[-1])
    doc_starts = float(re.findall(r"val bpb at document starts: ([0-9.]+)", text)[-1])
    dts = [(int(step), float(ms)) for step, ms in re.findall(r"step (\d+)/\d+ .*?dt: ([0-9.]+)ms", text)]
    dts = [ms for step, ms in dts if step > 10] or [ms for _, ms in dts]  # (the first steps warm up)
    return {"config": name, "depth": depth, "steps": steps, "seed": seed, "seq_len": args.seq_len, "rows": args.rows,
            "flags": flags(name, steps, tokens),
            "val_bpb": bpb, "doc_start_bpb": doc_starts, "step_ms": statistics.median(dts)}


def cell(row):
    """The cell a finished row belongs to: (depth, steps, sequence length, rows per step); rows from
    before the sequence length was recorded are the preset's 8 x 512."""
    return row["depth"], row["steps"], row.get("seq_len", 512), row.get("rows", 8)


def table(rows, key):
    """Markdown: the cell `key`'s rows, one per configuration (seeds averaged, their spread shown),
    deltas against the baseline."""
    depth, steps, seq_len, per_step = key
    by_config = {}
    for r in rows:
        if cell(r) == key:
            by_config.setdefault(r["config"], []).append(r)
    if not by_config:
        return ""
    mean = lambda rs, k: statistics.mean(r[k] for r in rs)  # noqa: E731
    ref = by_config.get("baseline")
    lines = [f"depth {depth}, {steps} steps of {per_step} x {seq_len} tokens", "",
             "| config | seeds | val bpb | seed spread | Δ bpb vs baseline | doc-start bpb | step ms | step time vs baseline |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rs in sorted(by_config.items(), key=lambda kv: mean(kv[1], "val_bpb")):
        bpbs = [r["val_bpb"] for r in rs]
        spread = f"{max(bpbs) - min(bpbs):.4f}" if len(rs) > 1 else "-"
        delta = f"{mean(rs, 'val_bpb') - mean(ref, 'val_bpb'):+.4f}" if ref else "-"
        ratio = f"{mean(rs, 'step_ms') / mean(ref, 'step_ms'):.2f}x" if ref else "-"
        starts = [r["doc_start_bpb"] for r in rs if "doc_start_bpb" in r]  # (rows from before it was measured lack it)
        starts = f"{statistics.mean(starts):.4f}" if starts else "-"
        lines.append(f"| {name} | {len(rs)} | {mean(rs, 'val_bpb'):.4f} | {spread} | {delta} | {starts} | {mean(rs, 'step_ms'):.0f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main():
    parser = make_parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="configurations to run")
    parser.add_argument("--depths", nargs="+", type=int, default=[4, 6])
    parser.add_argument("--steps", nargs="+", type=int, default=[200, 400])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1], help="seeds of every configuration")
    parser.add_argument("--baseline_seeds", nargs="+", type=int, default=[1, 2], help="seeds of the baseline (its spread)")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--rows", type=int, default=8, help="sequences per step (tokens per step = rows x seq_len)")
    parser.add_argument("--eval_tokens", type=int, default=262144, help="val tokens scored at the end of each run")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--tok_chars", type=int, default=100_000_000, help="tokenizer training text (at most)")
    parser.add_argument("--base_dir", default=os.path.expanduser("~/.cache/nanochat-recipe"), help="the bench's own data folder")
    parser.add_argument("--results", default=None, help="finished rows (default: BASE_DIR/recipe_results.jsonl)")
    parser.add_argument("--rerun", nargs="*", default=[], help="configurations to run again even if finished")
    parser.add_argument("--list", action="store_true", help="print the configurations and exit")
    args = parser.parse_args()
    if args.list:
        for name, flags in CONFIGS.items():
            described = " ".join(flags) or "(base_train's defaults)"
            for pinned, pinned_name in [(ROUND10, "round10"), (ROUND8, "round8"), (ROUND6, "round6"), (ROUND5, "round5"), (VWW, "values_warmdown_window"), (BASELINE, "baseline")]:
                if len(flags) > len(pinned) and flags[: len(pinned)] == pinned:
                    described = " ".join([pinned_name, *flags[len(pinned):]])
                    break
            print(f"{name:24s} {described}")
        return
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: unknown configuration(s) {unknown}; --list shows them")

    env = {**os.environ, "NANOCHAT_BASE_DIR": args.base_dir}
    prepare(env, args)
    results = args.results or os.path.join(args.base_dir, "recipe_results.jsonl")
    rows = [json.loads(line) for line in open(results)] if os.path.exists(results) else []
    if args.rerun:  # forget their rows, on disk too
        rows = [r for r in rows if r["config"] not in args.rerun]
        with open(results, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    done = {(r["config"], r["seed"], cell(r)) for r in rows}
    for depth in args.depths:
        for steps in args.steps:
            key = (depth, steps, args.seq_len, args.rows)
            for name in args.configs:
                for seed in args.baseline_seeds if name == "baseline" else args.seeds:
                    if (name, seed, key) in done:
                        continue
                    print(f"training {name} (depth {depth}, {steps} steps, seed {seed}) ...", flush=True)
                    row = train(env, args, name, depth, steps, seed)
                    print(f"  val bpb {row['val_bpb']:.4f}, median step {row['step_ms']:.0f} ms", flush=True)
                    rows.append(row)
                    with open(results, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print(f"\n{args.rows * args.seq_len} tokens per step, vocab {args.vocab}, val: {args.eval_tokens:,} tokens of whole documents\n")
    for depth in args.depths:
        for steps in args.steps:
            print(table(rows, (depth, steps, args.seq_len, args.rows)))


if __name__ == "__main__":
    main()
