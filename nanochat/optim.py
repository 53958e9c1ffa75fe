"""
Optimizers: AdamW for embeddings, Muon for the matrices of the transformer blocks.

Both are written once for one process and many: with torch.distributed initialised (NCCL or
gloo) each rank reduce-scatters the gradients, updates only the part it owns (so optimizer state
and work are split across ranks) and all-gathers the updated weights; with one process the
same code owns everything. A step has two halves so that gradient clipping sees the global norm:

    step_optimizers(optimizers, grad_clip)  # reduce_gradients() on each, clip, step() on each
"""

import torch
import torch.distributed as dist

from nanochat.common import compute_dtype


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _squares(params):
    """A float64 accumulator for the gradients' sum of squares (float32 on MPS, which has no float64):
    a rank's shards add up in another order than one process's whole tensors, and in float32 that
    moves the global norm, and so the clipping scale, by an ulp that the optimizers' sign tests and
    Adam's first steps can turn into 1e-4 in the weights."""
    device = params[0].device
    return torch.zeros((), device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)


def step_optimizers(optimizers, grad_clip=0.0):
    """Average gradients across ranks, clip them to a global norm of `grad_clip` (0 = off),
    update every parameter. Returns the gradient norm before clipping."""
    sq = sum(opt.reduce_gradients() for opt in optimizers)
    if _world()[1] > 1:
        dist.all_reduce(sq)
    norm = sq.sqrt().float()
    scale = (grad_clip / (norm + 1e-6)).clamp(max=1.0) if grad_clip > 0 else torch.ones_like(norm)
    for opt in optimizers:
        opt.step(grad_scale=scale)
    return norm.item()


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay). Across ranks, each owns a slice of rows of every parameter
    (rows must divide evenly; otherwise the parameter is updated whole on every rank)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._owned = {}  # param -> (its rows this rank owns, their averaged gradient)

    @torch.no_grad()
    def reduce_gradients(self):
        rank, world = _world()
        sq = _squares(self.param_groups[0]["params"])
        for group in self.param_groups:
            for p in group["params"]:
                if world > 1 and p.shape[0] % world == 0:
                    rows = p.shape[0] // world
                    grad = torch.empty_like(p[:rows])
                    dist.reduce_scatter_tensor(grad, p.grad.contiguous())
                    grad /= world
                    self._owned[p] = (p[rank * rows : (rank + 1) * rows], grad)
                    sq += grad.float().square().sum(dtype=sq.dtype)
                else:
                    if world > 1:
                        dist.all_reduce(p.grad)
                        p.grad /= world
                    self._owned[p] = (p, p.grad)
                    if rank == 0:  # replicated: count it once
                        sq += p.grad.float().square().sum(dtype=sq.dtype)
        return sq

    def state_bytes(self):
        """What this rank's state will take once the first step creates it: two float32 moments of
        the rows it owns."""
        _, world = _world()
        return sum(8 * (p.numel() // world if world > 1 and p.shape[0] % world == 0 else p.numel())
                   for group in self.param_groups for p in group["params"])

    @torch.no_grad()
    def step(self, grad_scale=1.0):
        rank, world = _world()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                shard, grad = self._owned.pop(p)
                grad = grad * grad_scale
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(shard)
                    state["exp_avg_sq"] = torch.zeros_like(shard)
                state["step"] += 1
                t = state["step"].item()
                shard.mul_(1 - lr * wd)
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].lerp_(grad.square(), 1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(eps)
                shard.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))
                if shard is not p:
                    dist.all_gather_into_tensor(p, shard.clone())


# Newton–Schulz iterations: (the factor over the Frobenius norm that the input is divided by,
# [(a, b, c) of each iteration's quintic]).
NEWTON_SCHULZ = {
    # one quintic five times: fast growth of small singular values, ending roughly in [0.7, 1.2]
    "classic": (1.0, [(3.4445, -4.7750, 2.0315)] * 5),
    # "Polar Express": each iteration's quintic is the best for where the singular values then lie,
    # derived by dev/polar_express.py for [1e-3, 1]; they end in [0.88, 1.12]. Each is fit 1% past
    # the top of its interval, and the input is divided by 2% more than its norm: bf16 rounding
    # pushes values a little past where they should lie, and past its interval a quintic this
    # steep throws them far from 1.
    "polar": (1.02, [(8.386893, -24.371311, 17.726412), (4.143012, -3.018618, 0.552650), (3.931188, -2.874113, 0.536722),
                     (3.282798, -2.416554, 0.486531), (2.284975, -1.632360, 0.403066)]),
}


def orthogonalize(G, method="classic", dtype=None):
    """
    Newton–Schulz iteration towards the nearest semi-orthogonal matrix U V^T of G = U S V^T:
    odd quintics that push every singular value towards 1 within a few steps (exact orthogonality
    is not needed, speed is). In `dtype`: by default the compute dtype (bf16 on GPU, float32 on
    CPU, where bf16 matmuls are ~150x slower, unless $NANOCHAT_DTYPE says otherwise).
    """
    cushion, coefficients = NEWTON_SCHULZ[method]
    X = G.to(dtype or compute_dtype(G.device))
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * cushion + 1e-7)  # singular values into [0, 1]
    for a, b, c in coefficients:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if transposed else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """
    MomentUm Orthogonalized by Newton–Schulz, for 2-D weight matrices: SGD with Nesterov momentum
    whose update is orthogonalized, scaled by sqrt(max(1, rows/cols)) so that tall and wide
    matrices move alike. Across ranks, parameters of one shape are handled in groups of
    world_size: rank r owns the r-th of each group (its momentum lives only there).

    Options: `newton_schulz` picks the iteration (NEWTON_SCHULZ). `equilibrate_rows` (MuonEq-R)
    scales each row of the momentum to unit norm before orthogonalizing: Newton–Schulz then starts
    from a better-conditioned matrix, and no output neuron's gradient dominates the update's
    directions. `normuon_beta2` > 0 (NorMuon)
    divides each row (output neuron) of the orthogonalized update by the root of an EMA of its mean
    square, then rescales the whole to the norm it had: orthogonalization equalises directions but
    leaves some neurons' rows much larger than others'. `weight_decay` is cautious: it shrinks only
    the entries the update also moves towards zero (same sign as the weight), at lr * weight_decay.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, newton_schulz="classic", equilibrate_rows=False,
                 normuon_beta2=0.0, weight_decay=0.0):
        params = list(params)
        if any(p.ndim != 2 for p in params):
            raise ValueError("Muon only optimizes 2-D matrices")
        if newton_schulz not in NEWTON_SCHULZ:
            raise ValueError(f"newton_schulz must be one of {sorted(NEWTON_SCHULZ)}, not {newton_schulz!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, newton_schulz=newton_schulz,
                                      equilibrate_rows=equilibrate_rows, normuon_beta2=normuon_beta2,
                                      weight_decay=weight_decay))
        rank, world = _world()
        order = {id(p): i for i, p in enumerate(params)}
        by_shape = sorted(params, key=lambda p: (tuple(p.shape), order[id(p)]))
        self._groups = []  # lists of at most world_size parameters of one shape
        for p in by_shape:
            if self._groups and len(self._groups[-1]) < world and self._groups[-1][0].shape == p.shape:
                self._groups[-1].append(p)
            else:
                self._groups.append([p])
        self._owned = {}  # param -> its averaged gradient, for the parameters this rank updates

    @torch.no_grad()
    def reduce_gradients(self):
        rank, world = _world()
        sq = _squares(self.param_groups[0]["params"])
        for group in self._groups:
            if world == 1:
                grad = group[0].grad
            else:
                pad = [torch.zeros_like(group[0])] * (world - len(group))
                grad = torch.empty_like(group[0])
                dist.reduce_scatter(grad, [p.grad.contiguous() for p in group] + pad)
                grad /= world
            if rank < len(group):
                self._owned[group[rank]] = grad
                sq += grad.float().square().sum(dtype=sq.dtype)
        return sq

    def state_bytes(self):
        """What this rank's state will take once the first step creates it: the float32 momentum of
        the matrices it owns (and NorMuon's mean square per row)."""
        rank, _ = _world()
        rows = {p: p.size(0) if g["normuon_beta2"] > 0 else 0 for g in self.param_groups for p in g["params"]}
        return sum(4 * (group[rank].numel() + rows[group[rank]]) for group in self._groups if rank < len(group))

    @torch.no_grad()
    def step(self, grad_scale=1.0):
        rank, world = _world()
        hyper = {p: g for g in self.param_groups for p in g["params"]}
        for group in self._groups:
            mine = group[rank] if rank < len(group) else None
            if mine is not None:
                h = hyper[mine]
                grad = self._owned.pop(mine) * grad_scale
                state = self.state[mine]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - h["momentum"])
                update = grad.lerp(buf, h["momentum"]) if h["nesterov"] else buf
                if h["equilibrate_rows"]:
                    update = update / update.norm(dim=1, keepdim=True).clamp(min=1e-7)
                update = orthogonalize(update, h["newton_schulz"])
                if h["normuon_beta2"] > 0:
                    update = self._normalize_rows(update, state, h["normuon_beta2"])
                if h["weight_decay"] > 0:  # cautious: where the update shrinks the weight too
                    mine.sub_(mine * (update * mine > 0), alpha=h["lr"] * h["weight_decay"])
                mine.add_(update, alpha=-h["lr"] * max(1.0, mine.size(-2) / mine.size(-1)) ** 0.5)
            if world > 1:
                source = mine.clone() if mine is not None else torch.zeros_like(group[0])
                pad = [torch.empty_like(group[0]) for _ in range(world - len(group))]
                dist.all_gather(list(group) + pad, source)

    @staticmethod
    def _normalize_rows(update, state, beta2):
        """NorMuon: each row over the root of an EMA of its mean square, the whole at its old norm."""
        if "row_sq" not in state:
            state["row_sq"] = torch.zeros(update.size(0), 1, dtype=torch.float32, device=update.device)
        row_sq = state["row_sq"]
        row_sq.lerp_(update.float().square().mean(dim=1, keepdim=True), 1 - beta2)
        normalized = update / (row_sq.sqrt() + 1e-10).to(update.dtype)
        return normalized * (update.norm() / normalized.norm().clamp(min=1e-10))
