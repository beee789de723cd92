"""An exponential moving average (EMA) of the encoder's and decoder's weights (train.ema).

    avg_t = d_t * avg_{t-1} + (1 - d_t) * theta_t,   d_t = min(decay, (1 + t) / (10 + t))

with t the updates so far: the ramp-up makes the first averages follow the fast-changing
early weights closely instead of dragging the random initialisation along for ~1/(1-decay)
steps. Batch-norm running statistics are averaged too, so the averaged networks normalise
with statistics of their own weights' era. The discriminator is not averaged: it is only
trained against, never served.

When EMA is on, the averaged networks are what the image grids, the evaluation, every
checkpoint's model file and the registered model use; the live weights (what the optimizers
step) travel in the checkpoint's trainer state, so a resumed run continues both exactly.
Single device: no Ray, MLflow or torch.distributed.
"""

from __future__ import annotations

import copy

import torch
from torch.optim.swa_utils import AveragedModel

from vaegan.model import VAEGAN

RAMPUP = 10.0


class EMA:
    """The averaged encoder and decoder of `model`, and `served`: a VAEGAN of those two and a
    discriminator of its own (`served_with` copies the live one's weights in). Not the live
    discriminator itself: the served model is switched to eval mode for grids and evaluation,
    and that must never reach a network in training."""

    def __init__(self, model: VAEGAN, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay {decay!r} must be in (0, 1)")
        self.decay, self.updates = decay, 0
        self.encoder = AveragedModel(model.encoder, multi_avg_fn=self._lerp, use_buffers=True)
        self.decoder = AveragedModel(model.decoder, multi_avg_fn=self._lerp, use_buffers=True)
        self.served = VAEGAN(model.cfg, encoder=self.encoder.module, decoder=self.decoder.module,
                             discriminator=copy.deepcopy(model.discriminator))
        self.served.eval()

    def weight(self) -> float:
        """d_t of the next update."""
        return min(self.decay, (1 + self.updates) / (RAMPUP + self.updates))

    def _lerp(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _n) -> None:
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1 - self.weight())
        else:  # BN's batch counters: integers, taken as they are
            torch._foreach_copy_(averaged, current)

    @torch.no_grad()
    def served_with(self, discriminator: torch.nn.Module) -> VAEGAN:
        """`served`, its discriminator holding `discriminator`'s weights now (a checkpoint
        keeps the live discriminator; the evaluation's Dis_l distance uses it)."""
        self.served.discriminator.load_state_dict(discriminator.state_dict())
        return self.served

    @torch.no_grad()
    def update(self, model: VAEGAN) -> None:
        """After each optimizer step: fold the live weights into the averages."""
        self.encoder.update_parameters(model.encoder)
        self.decoder.update_parameters(model.decoder)
        self.updates += 1

    @torch.no_grad()
    def reset(self, averaged: VAEGAN, updates: int) -> None:
        """Averages <- the encoder and decoder of `averaged` (a checkpoint's served model),
        as if after `updates` updates (0: the next update copies the live weights)."""
        self.encoder.module.load_state_dict(averaged.encoder.state_dict())
        self.decoder.module.load_state_dict(averaged.decoder.state_dict())
        self.updates = updates
        for avg in (self.encoder, self.decoder):
            avg.n_averaged.fill_(updates)
