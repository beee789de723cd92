"""The only module that touches torch.distributed and DDP.

Ray Train has already created the process group (gloo on CPU, nccl on GPU) when the worker
loop starts; here the ranks agree on their gradients and scalars.

Each step exchanges gradients once. On GPUs each network gets its own DDP wrapper, whose
all-reduce runs on NCCL's stream while the backward goes on (a single wrapper whose forward
used only some parameters would break the next step, docs/method.md#pitfalls, and the step
routes different gradients into each network). On CPUs overlap buys nothing, since gloo's
copies take the cores the backward needs, while every collective is a point where a rank
that the OS paused holds up the others: there the networks stay bare and `exchange`
all-reduces their gradients and the step's scalars in one collective (docs/results.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from vaegan.model import VAEGAN


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def leave_group_if_alone() -> bool:
    """Destroy the process group when this is its only rank. -> whether it did.

    One rank exchanges nothing, but the group Ray Train made for it keeps gloo's TCP loop, a
    thread that wakes every 10 ms (its epoll timeout) at normal priority. While the step's
    threads fill the cores each wake-up preempts one of them, and the other waits at the next
    barrier of the parallel op until it is back (docs/results.md). Ray Train destroys the group
    at shutdown only if it is still there."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() == 1):
        return False
    dist.destroy_process_group()
    return True


def wrap(model: VAEGAN, device: torch.device, sync_bn: bool = False, ddp: bool | None = None
         ) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(encoder, decoder, discriminator), ready for a distributed step: each in its own DDP
    wrapper when `ddp` (default: on CUDA), else bare, with rank 0's weights and buffers copied
    to every rank once (as DDP does at wrapping) and their gradients left to `exchange`. Either
    way the batch-norm running statistics stay each rank's own; rank 0's are the ones
    checkpointed and evaluated. DDP is told not to copy rank 0's buffers before every forward:
    with loss.decoder_bn=separate the step runs the decoder twice before its backward, and
    torch releases before this one's (2.14) raise on that in-place copy of the first forward's
    saved batch-norm statistics (pytorch#175024).

    Every parameter of a network the step uses receives a gradient, each once per backward
    (a parameter used by two forwards accumulates once), so DDP's defaults (no
    unused-parameter search) hold. Each rank
    keeps its own batch statistics unless `sync_bn`: then batch norm normalises with the
    statistics of the global batch, and N workers compute what one would on all N batches.
    """
    nets = (model.encoder, model.decoder, model.discriminator)
    if not is_distributed():
        return nets
    ddp = device.type == "cuda" if ddp is None else ddp
    wrapped = []
    for net in nets:
        if sync_bn and device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        elif sync_bn:
            convert_global_batchnorm(net)
        if ddp:
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False)
        else:
            for t in [*net.parameters(), *net.buffers()]:
                dist.broadcast(t.data, 0)
        wrapped.append(net)
    return tuple(wrapped)


def exchange(nets: Sequence[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The step's `mean_across_ranks`: called after its backward passes, it averages the
    step's scalars over ranks and, in the same all-reduce, the gradients of the networks
    that no DDP wrapper reduces (in place). Identity when not distributed."""
    bare = [net for net in nets if not isinstance(net, nn.parallel.DistributedDataParallel)]

    def mean_across_ranks(scalars: torch.Tensor) -> torch.Tensor:
        if not is_distributed():
            return scalars
        # the same parameters have gradients on every rank: the ranks run the same passes
        grads = [p.grad for net in bare for p in net.parameters() if p.grad is not None]
        flat = torch.cat([*(g.reshape(-1) for g in grads), scalars.to(torch.float32)])
        dist.all_reduce(flat)  # on the tensors' device: CPU for gloo, CUDA for NCCL
        flat.div_(dist.get_world_size())
        *parts, averaged = flat.split([*(g.numel() for g in grads), scalars.numel()])
        for g, value in zip(grads, parts, strict=True):
            g.copy_(value.view(g.shape))  # copy_ keeps g's strides (channels-last)
        return averaged.to(scalars.dtype)

    return mean_across_ranks


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch of all ranks, on any device: in training, the mean
    and variance are reduced across ranks with a differentiable all-reduce (so gradients
    flow through the shared statistics to every rank's inputs, as in one process).
    torch's SyncBatchNorm does this on GPUs only (DDP refuses it in a CPU module), and the
    CPU workers (gloo) are where the service is tested. Same parameters and buffers as the
    BatchNorm it replaces, so checkpoints do not change."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {x.dim()}-D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        # Deprecated in favour of _functional_collectives.all_reduce, which has no autograd
        # (the gradient through the shared statistics is the point): keep it, quietly.
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_reduce is deprecated",
                                FutureWarning)
        c, dims = x.shape[1], [0, *range(2, x.dim())]
        xf = x.float()  # statistics in fp32 also under bf16 autocast
        local = torch.cat([xf.sum(dims), xf.square().sum(dims), xf.new_tensor([x.numel() // c])])
        total = all_reduce(local)  # sums over ranks; its backward sums the gradients over ranks
        count = total[-1]
        mean = total[:c] / count
        var = total[c:2 * c] / count - mean.square()
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked + 1)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * count / (count - 1), m)  # unbiased, as BatchNorm
                self.num_batches_tracked += 1
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every BatchNorm1d/2d inside `module` into a GlobalBatchNorm, in place (same
    parameter and buffer tensors)."""
    for child in module.children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            child.__class__ = GlobalBatchNorm  # keeps its tensors and state_dict keys
        else:
            convert_global_batchnorm(child)
    return module


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, on the device the backend reduces on (NCCL takes only CUDA tensors;
    the result comes back where `t` was)."""
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    out = t.to(on, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def mean(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (identity when not distributed)."""
    if not is_distributed():
        return t
    return _all_reduce_sum(t) / dist.get_world_size()


def total(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (identity when not distributed)."""
    if not is_distributed():
        return t
    return _all_reduce_sum(t)


def gather(value: object) -> list:
    """Every rank's `value`, in rank order (a one-element list when not distributed)."""
    if not is_distributed():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
