"""Two ranks with synchronised batch norm compute what one process computes on the whole
batch: after a few steps of Algorithm 1 the weights agree (gloo on the CPU, no Ray).

This is what makes adding workers a pure speed-up: with per-rank batch statistics the
result would depend on how the global batch is split."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from servers import free_port

from vaegan import distributed
from vaegan.config import load_config
from vaegan.model import VAEGAN
from vaegan.step import TrainStep

STEPS, BATCH = 3, 8  # the global batch; each of the two ranks takes half


def config():
    """The decoder's batch norm separate for z and z_p (two forwards: mnist32's). fp32 so the
    comparison is tight; the equilibrium rule on, so the ranks' costs must agree
    too. RMSProp with eps=1 steps by ~lr * g: its usual tiny eps would blow the ~1e-9 rounding
    noise in the gradients of the conv biases that batch norm cancels up to full-size steps
    of random sign, in both runs alike, and hide what is compared."""
    return load_config("debug", overrides=["train.precision=fp32", "train.channels_last=false",
                                           "loss.equilibrium=true", "optim.eps=1.0", "optim.lr=0.05",
                                           "loss.decoder_bn=separate"])


def batches(cfg):
    """The same global batches and noise (eps, z_p) in every process."""
    g = torch.Generator().manual_seed(0)
    m = cfg.model
    out = []
    for _ in range(STEPS):
        x = torch.rand(BATCH, m.channels, m.image_size, m.image_size, generator=g) * 2 - 1
        eps, z_p = (torch.randn(BATCH, m.latent_dim, generator=g) for _ in range(2))
        out.append((x, eps, z_p))
    return out


def train(rank: int, world: int, sync_bn: bool, ddp: bool = False) -> dict[str, torch.Tensor]:
    cfg = config()
    torch.manual_seed(cfg.train.seed)
    model = VAEGAN(cfg.model)
    nets = distributed.wrap(model, torch.device("cpu"), sync_bn=sync_bn, ddp=ddp)
    step = TrainStep(*nets, cfg, "cpu", mean_across_ranks=distributed.exchange(nets))
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for x, eps, z_p in batches(cfg):
        step(x[part], noise=(eps[part], z_p[part]))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


VARIANTS = [(True, False), (True, True), (False, False), (False, True)]  # (sync_bn, ddp)


def _rank(rank: int, world: int, port: int, out: str) -> None:
    """Every variant in one pair of processes: a spawned process spends seconds importing
    torch, the training of a variant a fraction of one."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for sync_bn, ddp in VARIANTS:
            torch.save(train(rank, world, sync_bn, ddp), out.format(rank=rank, sync_bn=sync_bn, ddp=ddp))
    finally:
        dist.destroy_process_group()


def two_ranks(tmp_path) -> dict[tuple[bool, bool], dict[str, torch.Tensor]]:
    """(sync_bn, ddp) -> rank 0's weights, after checking that rank 1 holds the same (the
    ranks stepped alike)."""
    out = str(tmp_path / "rank{rank}-sync{sync_bn}-ddp{ddp}.pt")
    mp.spawn(_rank, args=(2, free_port(), out), nprocs=2, join=True)
    weights = {}
    for sync_bn, ddp in VARIANTS:
        rank0, rank1 = (torch.load(out.format(rank=r, sync_bn=sync_bn, ddp=ddp)) for r in range(2))
        names = [k for k in rank0 if "running" not in k and "num_batches" not in k]  # BN stats: per rank
        assert max_difference({k: rank0[k] for k in names}, {k: rank1[k] for k in names}) < 1e-6
        weights[sync_bn, ddp] = rank0
    return weights


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.mark.slow
def test_two_ranks_with_sync_bn_match_one_process_on_the_global_batch(tmp_path):
    """Both ways the ranks exchange gradients: one all-reduce of everything after the
    backward passes (CPUs), and DDP's hooks during them (GPUs; here on gloo)."""
    one = train(0, 1, sync_bn=False)
    two = two_ranks(tmp_path)
    assert max_difference(two[True, False], one) < 1e-4
    assert max_difference(two[True, True], one) < 1e-4
    # the comparison has teeth: per-rank batch statistics give other weights
    per_rank = two[False, False]
    assert max_difference(per_rank, one) > 1e-3
    # and DDP's hooks reduce what the one all-reduce does with plain batch norm too, where each
    # decoder parameter serves two forwards (x~ and x_p) and must be reduced once
    assert max_difference(two[False, True], per_rank) < 1e-5
