"""common.py: base dir, and distributed setup under a real torchrun with the gloo backend."""

import os
import subprocess
import sys
import textwrap

from conftest import REPO
from nanochat.common import DummyWandb, get_base_dir


def test_base_dir_from_env(base_dir):
    assert get_base_dir() == str(base_dir)
    assert base_dir.is_dir()


def test_dummy_wandb_accepts_anything():
    run = DummyWandb()
    run.log({"loss": 1.0}, step=3)
    run.finish()


def test_torchrun_two_ranks_on_gloo(tmp_path):
    script = tmp_path / "ddp_probe.py"
    script.write_text(textwrap.dedent("""
        import os, torch, torch.distributed as dist
        from nanochat.common import compute_init, compute_cleanup, print0
        is_ddp, rank, local_rank, world_size, device = compute_init("cpu")
        x = torch.tensor([rank + 1.0])
        dist.all_reduce(x)
        w = torch.randn(3)  # same seed on every rank: same initial weights
        gathered = [torch.zeros(3) for _ in range(world_size)]
        dist.all_gather(gathered, w)
        print(f"rank={rank} world={world_size} ddp={is_ddp} device={device} sum={x.item()} "
              f"same_init={all(torch.equal(g, w) for g in gathered)}", flush=True)
        print0(f"print0 from rank {rank}")
        torch.optim.SGD([w.requires_grad_()], lr=0.1)  # imports torch.distributed.nn, as every trainer does
        compute_cleanup()
        # gloo's worker threads are joined now, not left to interpreter exit (where they can abort)
        gloo = [t for t in os.listdir("/proc/self/task") if "gloo" in open(f"/proc/self/task/{t}/comm").read()]
        print(f"rank={rank} gloo threads after cleanup: {len(gloo)}", flush=True)
    """))
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr
    for rank in (0, 1):
        assert f"rank={rank} world=2 ddp=True device=cpu sum=3.0 same_init=True" in r.stdout
        assert f"rank={rank} gloo threads after cleanup: 0" in r.stdout
    assert "print0 from rank 0" in r.stdout and "print0 from rank 1" not in r.stdout


def test_bad_device_type_is_a_clear_error():
    r = subprocess.run(
        [sys.executable, "-c", "from nanochat.common import compute_init; compute_init('tpu')"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode != 0
    assert r.stderr.strip() == "error: unknown --device_type='tpu'; expected cuda, mps or cpu"
