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


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def step_optimizers(optimizers, grad_clip=0.0):
    """Average gradients across ranks, clip them to a global norm of `grad_clip` (0 = off),
    update every parameter. Returns the gradient norm before clipping."""
    sq = sum(opt.reduce_gradients() for opt in optimizers)
    if _world()[1] > 1:
        dist.all_reduce(sq)
    norm = sq.sqrt()
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
        sq = torch.zeros((), device=self.param_groups[0]["params"][0].device)
        for group in self.param_groups:
            for p in group["params"]:
                if world > 1 and p.shape[0] % world == 0:
                    rows = p.shape[0] // world
                    grad = torch.empty_like(p[:rows])
                    dist.reduce_scatter_tensor(grad, p.grad.contiguous())
                    grad /= world
                    self._owned[p] = (p[rank * rows : (rank + 1) * rows], grad)
                    sq += grad.float().square().sum()
                else:
                    if world > 1:
                        dist.all_reduce(p.grad)
                        p.grad /= world
                    self._owned[p] = (p, p.grad)
                    if rank == 0:  # replicated: count it once
                        sq += p.grad.float().square().sum()
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


def orthogonalize(G, steps=5):
    """
    Newton–Schulz iteration towards the nearest semi-orthogonal matrix U V^T of G = U S V^T:
    a quintic whose coefficients push every singular value into roughly [0.7, 1.2] within a few
    steps (exact orthogonality is not needed, speed is). bf16 on GPU; float32 on CPU, where bf16
    matmuls are ~150x slower.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values into [0, 1]
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if transposed else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """
    MomentUm Orthogonalized by Newton–Schulz, for 2-D weight matrices: SGD with Nesterov momentum
    whose update is orthogonalized, scaled by sqrt(max(1, rows/cols)) so that tall and wide
    matrices move alike. Across ranks, parameters of one shape are handled in groups of
    world_size: rank r owns the r-th of each group (its momentum lives only there).
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        params = list(params)
        if any(p.ndim != 2 for p in params):
            raise ValueError("Muon only optimizes 2-D matrices")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
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
        sq = torch.zeros((), device=self.param_groups[0]["params"][0].device)
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
                sq += grad.float().square().sum()
        return sq

    def state_bytes(self):
        """What this rank's state will take once the first step creates it: the float32 momentum of
        the matrices it owns."""
        rank, _ = _world()
        return sum(4 * group[rank].numel() for group in self._groups if rank < len(group))

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
                update = orthogonalize(update, h["ns_steps"])
                mine.add_(update, alpha=-h["lr"] * max(1.0, mine.size(-2) / mine.size(-1)) ** 0.5)
            if world > 1:
                source = mine.clone() if mine is not None else torch.zeros_like(group[0])
                pad = [torch.empty_like(group[0]) for _ in range(world - len(group))]
                dist.all_gather(list(group) + pad, source)
