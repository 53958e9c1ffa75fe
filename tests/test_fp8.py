"""Float8 training matmuls (base_train --fp8) against float32, on CPU (torch._scaled_mm runs there
too, slowly): what a GPU with float8 tensor cores computes, checked where every test runs."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from nanochat.fp8 import E4M3, E5M2, Float8Linear, to_float8
from nanochat.gpt import GPT, config_for_depth
from nanochat.optim import step_optimizers


def cosine(a, b):
    return F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


@pytest.mark.parametrize("dtype, mantissa_bits", [(E4M3, 3), (E5M2, 2)])
def test_float8_round_trip(dtype, mantissa_bits):
    """The largest magnitude maps to float8's largest; every value comes back to within float8's
    relative precision (2^-(mantissa bits + 1)), except those below its normal range."""
    t = torch.randn(1000) * 3
    q, inverse = to_float8(t, dtype)
    assert q.dtype == dtype and q.float().abs().max().item() == torch.finfo(dtype).max
    back = q.float() * inverse
    normal = t.abs() > t.abs().max() * 2.0**-6
    assert torch.all((back - t)[normal].abs() <= t[normal].abs() * 2.0 ** -(mantissa_bits + 1) + 1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float8_linear_forward_and_gradients_track_float32(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 32, 64).to(dtype).requires_grad_()
    w = (torch.randn(96, 64) * 0.1).requires_grad_()
    grad = torch.randn(4, 32, 96).to(dtype)
    y = Float8Linear.apply(x, w)
    y.backward(grad)
    assert y.dtype == dtype and x.grad.dtype == dtype and w.grad.dtype == torch.float32  # the masters' dtype
    fp8 = (y.detach(), x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    reference = F.linear(x.float(), w)
    reference.backward(grad.float())
    for ours, ref in zip(fp8, (reference.detach(), x.grad, w.grad)):
        assert cosine(ours, ref) > 0.995  # float8 rounding, not a wrong matmul (those score ~0)
        assert (ours.float() - ref).norm() / ref.norm() < 0.1


def make(seed=0):
    torch.manual_seed(seed)
    model = GPT(config_for_depth(2, 256, 32))
    model.init_weights()
    return model


def test_fp8_model_trains_like_the_float32_one_and_evaluates_unchanged():
    batch = torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(1))
    curves = []
    for fp8 in (False, True):
        model = make()
        if fp8:
            model.use_fp8()
        optimizers = model.setup_optimizers()
        losses = []
        for _ in range(30):
            loss = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            step_optimizers(optimizers, grad_clip=1.0)
            model.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves.append(losses)
        if fp8:  # evaluation is the plain path: the same numbers as an ordinary model with these weights
            plain = make()
            plain.load_state_dict(model.state_dict())
            model.eval()
            with torch.no_grad():
                assert torch.equal(model(batch[:, :-1]), plain.eval()(batch[:, :-1]))
    plain, fp8 = curves
    assert fp8[-1] < 0.5 * fp8[0] and abs(fp8[-1] - plain[-1]) < 0.05 * plain[-1]


def test_fp8_flag_off_a_float8_gpu_is_a_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", "--fp8=1", "--device_type=cpu", "--depth=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --fp8=1 needs a CUDA GPU with float8 matmuls")
