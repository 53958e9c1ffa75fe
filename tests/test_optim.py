"""Optimizers against hand-written references, and 2 ranks (torchrun, gloo) against 1 process."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import REPO
from nanochat.optim import NEWTON_SCHULZ, AdamW, Muon, orthogonalize, step_optimizers


def test_adamw_matches_torch():
    torch.manual_seed(0)
    a = torch.randn(8, 5, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    ours = AdamW([a], lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(8, 5)
        a.grad, b.grad = grad.clone(), grad.clone()
        step_optimizers([ours])
        ref.step()
    assert torch.allclose(a, b, atol=1e-6)


CLASSIC = (1.0, [(3.4445, -4.7750, 2.0315)] * 5)


def polar_express_coefficients():
    """Derived afresh by dev/polar_express.py (the minimax quintics), not read from optim.py."""
    spec = importlib.util.spec_from_file_location("polar_express", os.path.join(REPO, "dev", "polar_express.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return (1.02, module.polar_express()[0])


def newton_schulz_reference(G, method=CLASSIC):
    """The quintic Newton–Schulz iterations in float64 numpy, written out plainly."""
    cushion, coefficients = method
    X = G.astype(np.float64)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (np.linalg.norm(X) * cushion + 1e-7)
    for a, b, c in coefficients:
        A = X @ X.T
        X = a * X + b * A @ X + c * A @ A @ X
    return X.T if tall else X


@pytest.mark.parametrize("rows, cols, aspect", [(6, 10, 1.0), (10, 6, (10 / 6) ** 0.5), (24, 6, 2.0)])
@pytest.mark.parametrize("options", [{}, {"newton_schulz": "polar", "normuon_beta2": 0.9, "weight_decay": 0.5},
                                     {"equilibrate_rows": True}],
                         ids=["classic", "polar+normuon+cautious wd", "muoneq-r"])
def test_muon_matches_reference_step(rows, cols, aspect, options):
    """Wide matrices take the orthogonalized step as is; tall ones scaled by sqrt(rows / cols).
    MuonEq-R first scales each row of the momentum to unit norm; NorMuon divides each row of the
    orthogonalized update by the root of an EMA of its mean square and restores the norm;
    cautious weight decay shrinks the entries whose update has the weight's sign."""
    torch.manual_seed(0)
    w = torch.randn(rows, cols, requires_grad=True)
    w0 = w.detach().numpy().copy()
    opt = Muon([w], lr=0.1, momentum=0.9, nesterov=True, **options)
    method = polar_express_coefficients() if options.get("newton_schulz") == "polar" else CLASSIC
    beta2, wd = options.get("normuon_beta2", 0.0), options.get("weight_decay", 0.0)
    buf, row_sq = np.zeros_like(w0), np.zeros((rows, 1))
    expected = w0.astype(np.float64)
    for _ in range(3):
        grad = torch.randn(rows, cols)
        w.grad = grad.clone()
        step_optimizers([opt])
        g = grad.numpy().astype(np.float64)
        buf = 0.9 * buf + 0.1 * g
        nesterov = 0.1 * g + 0.9 * buf  # the gradient pulled towards the momentum
        if options.get("equilibrate_rows"):
            nesterov = nesterov / np.linalg.norm(nesterov, axis=1, keepdims=True)
        update = newton_schulz_reference(nesterov, method)
        if beta2:
            row_sq = beta2 * row_sq + (1 - beta2) * (update**2).mean(axis=1, keepdims=True)
            normalized = update / np.sqrt(row_sq)
            update = normalized * np.linalg.norm(update) / np.linalg.norm(normalized)
        expected = expected - 0.1 * wd * expected * (np.sign(update) == np.sign(expected))
        expected = expected - 0.1 * aspect * update
    assert np.allclose(w.detach().numpy(), expected, atol=1e-4)


def test_polar_express_coefficients_are_the_derived_ones():
    cushion, ours = NEWTON_SCHULZ["polar"]
    assert np.allclose(ours, polar_express_coefficients()[1], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16 (as on GPU)"])
@pytest.mark.parametrize("method, band", [("classic", (0.6, 1.3)), ("polar", (0.85, 1.15))])
def test_orthogonalized_update_has_singular_values_near_one(method, band, dtype):
    """Gradients with singular values spread over two decades, against an SVD: 5 iterations bring
    all near 1 (the classic quintic roughly into [0.7, 1.2]; Polar Express into [0.88, 1.12]), in
    float32 and in bf16, whose rounding would throw Polar Express quintics fit to their intervals
    exactly (without the 1% stretch) out to singular values of 4 to 50 here."""
    torch.manual_seed(0)
    for rows, cols in [(64, 64), (128, 32), (32, 256), (256, 512)]:
        k = min(rows, cols)
        U, _ = torch.linalg.qr(torch.randn(rows, k))
        V, _ = torch.linalg.qr(torch.randn(cols, k))
        G = U @ torch.diag(torch.logspace(-2, 0, k)) @ V.T * 37.0
        s = torch.linalg.svdvals(orthogonalize(G, method, dtype).float())
        assert band[0] < s.min() and s.max() < band[1], (rows, cols, s.min(), s.max())


def test_step_optimizers_reports_global_norm():
    torch.manual_seed(0)
    a, b = torch.randn(4, 4, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    a.grad, b.grad = torch.randn(4, 4), torch.randn(3, 5)
    expected = torch.cat([a.grad.flatten(), b.grad.flatten()]).norm().item()
    assert abs(step_optimizers([AdamW([a]), Muon([b])], grad_clip=0.5) - expected) < 1e-5


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    from nanochat.common import compute_init, compute_cleanup
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.optim import step_optimizers

    def train(parts, steps=4):
        # 4 query heads on 2 key/value heads; 3 layers, so Muon's groups of 2 same-shape matrices
        # (one per rank) leave an odd one over, padded on the rank without a matrix.
        torch.manual_seed(0)
        with torch.device("meta"):
            model = GPT(GPTConfig(sequence_len=32, vocab_size=256, n_layer=3, n_head=4, n_kv_head=2, n_embd=128,
                                  value_embeds=True, residual_scalars=True))
        model.to_empty(device="cpu")
        model.init_weights()
        with torch.no_grad():  # attention and MLP outputs that matter from the first step
            for block in model.transformer.h:
                block.attn.c_proj.weight.normal_(std=0.02)
                block.mlp.c_proj.weight.normal_(std=0.02)
        optimizers = model.setup_optimizers(weight_decay=0.1, matrix_weight_decay=0.1, newton_schulz="polar", normuon_beta2=0.95)
        batch = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
        losses = []
        for _ in range(steps):  # the same global batch every step: the loss must fall
            loss = 0.0
            for part in parts:  # each a micro-batch of the step
                part_loss = model(batch[part, :-1], batch[part, 1:]) / len(parts)
                part_loss.backward()
                loss += part_loss.item()
            step_optimizers(optimizers, grad_clip=0.5)
            model.zero_grad(set_to_none=True)
            losses.append(loss)
        return model, losses

    # A rank's 2 rows, or one process accumulating the same two halves: the same arithmetic, since
    # (g0 + g1) / 2 == g0 / 2 + g1 / 2 exactly. (Summing all 4 rows at once would differ by rounding,
    # which Adam's sign-like first steps and the cautious decay's sign test turn into ~1e-3.)
    if sys.argv[1] == "ddp":
        _, rank, _, world, _ = compute_init("cpu")
        model, losses = train([slice(2 * rank, 2 * rank + 2)])
        torch.save({"state": model.state_dict(), "losses": losses}, f"{sys.argv[2]}.rank{rank}")
        compute_cleanup()
    else:
        model, losses = train([slice(0, 2), slice(2, 4)])
        torch.save({"state": model.state_dict(), "losses": losses}, sys.argv[2])
""")


def single_and_ranks(tmp_path, code):
    """Run `code` as `script single OUT` and under torchrun as `script ddp OUT` on 2 ranks (gloo);
    returns what the single process saved and what each rank saved."""
    script = tmp_path / "script.py"
    script.write_text(code)
    # MKL picks its matmul kernels by the operands' memory alignment too, so that on some CPUs the
    # same product rounds differently in two processes; its compatible mode does not.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE"}
    single = subprocess.run([sys.executable, str(script), "single", str(tmp_path / "single.pt")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), "ddp", str(tmp_path / "ddp.pt")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr
    return torch.load(tmp_path / "single.pt"), [torch.load(tmp_path / f"ddp.pt.rank{r}") for r in (0, 1)]


def test_two_ranks_equal_one_process(tmp_path):
    single, ranks = single_and_ranks(tmp_path, DDP_SCRIPT)
    for name, value in single["state"].items():
        for r in ranks:  # every rank ends with the single process's weights
            assert torch.allclose(value, r["state"][name], atol=2e-5, rtol=1e-4), name
    full = np.array(single["losses"])
    halves = (np.array(ranks[0]["losses"]) + np.array(ranks[1]["losses"])) / 2
    assert np.allclose(full, halves, atol=1e-5)  # each step's full-batch loss is the mean of the halves
    assert full[-1] < full[0]  # and training moved the weights


# The distributed branches a GPT's shapes may not reach: an AdamW parameter whose rows do not
# split over the ranks (updated whole on each), and a Muon shape group smaller than the world.
BRANCHES_SCRIPT = textwrap.dedent("""
    import sys, torch
    from nanochat.common import compute_init, compute_cleanup
    from nanochat.optim import AdamW, Muon, step_optimizers

    ADAMW_SHAPES = [(5, 3), (4, 3)]  # on 2 ranks: 5 rows are replicated, 4 rows split 2 + 2
    MUON_SHAPES = [(6, 4), (6, 4), (6, 4), (4, 6)]  # groups of 2, 1 (padded) and 1 (padded)

    def grad(step, i, part):
        return torch.randn((ADAMW_SHAPES + MUON_SHAPES)[i], generator=torch.Generator().manual_seed(100 * step + 10 * i + part))

    def run(gradient):
        torch.manual_seed(0)
        params = [torch.randn(s, requires_grad=True) for s in ADAMW_SHAPES + MUON_SHAPES]
        initial = [p.detach().clone() for p in params]
        optimizers = [AdamW(params[:2], lr=0.01, weight_decay=0.1), Muon(params[2:], lr=0.02, normuon_beta2=0.95)]
        norms, expected_state = [], [opt.state_bytes() for opt in optimizers]
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = gradient(step, i)
            norms.append(step_optimizers(optimizers, grad_clip=1.0))  # clipping is active: norms are ~4
        state = [sum(t.nbytes for s in opt.state.values() for t in s.values() if t.ndim) for opt in optimizers]
        return {"initial": initial, "params": [p.detach() for p in params], "norms": norms,
                "state_bytes": (expected_state, state)}

    if sys.argv[1] == "ddp":
        _, rank, _, world, _ = compute_init("cpu")
        torch.save(run(lambda step, i: grad(step, i, rank)), f"{sys.argv[2]}.rank{rank}")
        compute_cleanup()
    else:  # one process sees the mean of the two ranks' gradients
        torch.save(run(lambda step, i: (grad(step, i, 0) + grad(step, i, 1)) / 2), sys.argv[2])
""")


def test_replicated_and_padded_optimizer_branches_two_ranks_equal_one_process(tmp_path):
    single, ranks = single_and_ranks(tmp_path, BRANCHES_SCRIPT)
    for r in [single] + ranks:  # the state each rank holds, as predicted before it existed
        assert r["state_bytes"][0] == r["state_bytes"][1]
    muon_state = [r["state_bytes"][1][1] for r in [single] + ranks]
    assert muon_state[1] + muon_state[2] == muon_state[0]  # Muon's momentum is split over the ranks, not copied
    for r in ranks:
        assert np.allclose(r["norms"], single["norms"], rtol=1e-5)  # a replicated gradient counted once
        for i, (a, b) in enumerate(zip(single["params"], r["params"])):
            assert torch.allclose(a, b, atol=1e-6), i
    assert all(not torch.allclose(a, b) for a, b in zip(single["initial"], single["params"]))  # every one moved
    assert min(single["norms"]) > 1.0  # so clipping was at work


def test_schedules_at_known_steps():
    from nanochat.training import lr_multiplier, muon_momentum
    # 100 steps: 10 of warmup, 30 of warmdown to 10% of the peak
    assert [lr_multiplier(s, 100, 0.1, 0.3, 0.1) for s in (0, 4, 9, 10, 70, 85, 100)] == pytest.approx([0.1, 0.5, 1, 1, 1, 0.55, 0.1])
    # momentum: 0.85 -> 0.95 over 20 steps, back to 0.85 over the last 30
    assert [muon_momentum(s, 100, 20, 0.3) for s in (0, 10, 20, 70, 85, 100)] == pytest.approx([0.85, 0.9, 0.95, 0.95, 0.9, 0.85])
    assert muon_momentum(150, 1000, 300, 0.0) == pytest.approx(0.9)  # the classic ramp, no cooldown
    assert muon_momentum(0, 100, 0, 0.0) == pytest.approx(0.95)  # no warmup
