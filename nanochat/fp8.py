"""
Float8 training matmuls for the large linear layers (`base_train --fp8`), on GPUs with float8
tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell), where they run about twice as
fast as bf16.

Each matmul of a linear layer's training step runs in float8 with one scale per tensor, computed
from the tensor's current absolute maximum ("dynamic tensorwise" scaling): the forward's
activations and weights in e4m3 (more mantissa), the backward's output gradients in e5m2 (more
range). torch._scaled_mm multiplies the float8 operands and applies the inverse scales, writing
the compute dtype (activations) or float32 (the weight gradient, for the float32 master weights).
Evaluation and generation do not use it: a model trained this way is an ordinary checkpoint.
"""

import torch

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def supported(device):
    """Whether `device` has float8 matmuls worth using."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def to_float8(t, dtype):
    """t scaled so its largest magnitude is float8's largest, in float8; and the inverse scale."""
    amax = t.detach().abs().amax().float().clamp(min=1e-12)
    scale = torch.finfo(dtype).max / amax
    return (t.float() * scale).to(dtype), scale.reciprocal()


def _mm(a, b, a_scale, b_scale, out_dtype):
    """a @ b for float8 a (row-major) and b (made column-major, as _scaled_mm requires)."""
    return torch._scaled_mm(a, b.t().contiguous().t(), scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype)


class Float8Linear(torch.autograd.Function):
    """y = x @ w.T with all three matmuls of forward and backward in float8."""

    @staticmethod
    def forward(ctx, x, w):
        x2 = x.reshape(-1, x.size(-1))
        x8, x_inv = to_float8(x2, E4M3)
        w8, w_inv = to_float8(w, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, w.dtype
        return _mm(x8, w8.t(), x_inv, w_inv, x.dtype).view(*x.shape[:-1], w.size(0))

    @staticmethod
    def backward(ctx, grad_out):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = to_float8(grad_out.reshape(-1, grad_out.size(-1)), E5M2)
        grad_x = _mm(g8, w8, g_inv, w_inv, ctx.x_dtype).view(ctx.x_shape)
        grad_w = _mm(g8.t().contiguous(), x8, g_inv, x_inv, ctx.w_dtype)
        return grad_x, grad_w
