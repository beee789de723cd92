"""The only module that touches torch.distributed and DDP.

Ray Train has already created the process group (gloo on CPU, nccl on GPU) when the worker
loop starts; here we wrap the networks and reduce scalars. Each network gets its own DDP
wrapper: a single wrapper whose forward used only some parameters would break the next
step (docs/method.md#pitfalls), and the step routes different gradients into each network.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from vaegan.model import VAEGAN


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wrap(model: VAEGAN, device: torch.device, sync_bn: bool = False
         ) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(encoder, decoder, discriminator), each in its own DDP wrapper when distributed.

    The step runs one forward per network per step and every parameter of a network it
    uses receives a gradient, so the defaults (no unused-parameter search) hold. Each rank
    keeps its own batch statistics unless `sync_bn` (GPU only, as SyncBatchNorm needs).
    """
    nets = (model.encoder, model.decoder, model.discriminator)
    if not is_distributed():
        return nets
    ids = [device.index] if device.type == "cuda" else None
    wrapped = []
    for net in nets:
        if sync_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        wrapped.append(nn.parallel.DistributedDataParallel(net, device_ids=ids))
    return tuple(wrapped)


def mean(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (identity when not distributed)."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def total(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (identity when not distributed)."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather(value: object) -> list:
    """Every rank's `value`, in rank order (a one-element list when not distributed)."""
    if not is_distributed():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
