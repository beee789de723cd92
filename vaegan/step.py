"""Algorithm 1 of Larsen et al. 2016: one training step, with its gradient routing.

    X  <- mini-batch;  Z <- Enc(X);  L_prior <- KL(q(Z|X) || p(Z))
    X~ <- Dec(Z);      L_llike <- -E_q[log p(Dis_l(X) | Z)]
    Zp <- N(0, I);     Xp <- Dec(Zp)
    L_GAN <- log Dis(X) + log(1 - Dis(X~)) + log(1 - Dis(Xp))
    theta_Enc <- theta_Enc - grad_Enc (L_prior + L_llike)
    theta_Dec <- theta_Dec - grad_Dec (gamma * L_llike - L_GAN)
    theta_Dis <- theta_Dis - grad_Dis (L_GAN)              # Dis descends the BCE

All three gradients are taken at the same parameter values, then the three optimizers
step, exactly as written. The step is computed with little waste (docs/method.md#efficient-step):
each network runs one forward (Dec two with loss.decoder_bn=separate, on z and on z_p);
the decoder output and the discriminator input are cut into leaves so that different
gradients can be routed into each network:

    Dec  forward over [z; z_p] (or on each)    -> [x~; x_p]  (loss.decoder_bn)
    Dis  forward over [x; x~; x_p]             -> logits, Dis_l
    Dis  input-grad of L_llike (first l layers) -> g_ll at [x~; x_p]   (Dis weights: nothing)
    Dis  backward of L_GAN                      -> Dis grads, g_gan at [x~; x_p]  (one pass)
    Dec  backward of a*g_ll - b*g_gan           -> Dec grads  (a, b = gamma, 1 or w, 1-w)
    Dec  input-grad of g_ll                     -> g_z        (no GAN part reaches Enc)
    Enc  backward of L_prior + <z, g_z>         -> Enc grads

loss.mode=vae_dis_l (the paper's VAE_Dis_l) runs the same passes with no adversarial term
in Dec's gradient; vae and gan are the other baselines (docs/method.md#baselines). Two
training aids (docs/method.md#training-aids): loss.augment passes Dis's whole input through
differentiable transforms (x~ with x's draws, so Dis_l still compares like with like), and
loss.adversarial_warmup ramps the adversarial term's weight in Dec's gradient from 0 to 1.
loss.attribute_weight adds an attribute head's BCE on the real images to Dis's loss (AC-GAN),
so Dis_l learns to tell the labelled attributes apart; it reaches Dis's weights only.
loss.attribute_llike adds the head's reading of x~ against its reading of x to L_llike.

Batch norm over a concatenated batch couples its samples, so g_ll also has an x_p part and
g_gan an x~ part; both are routed. Single device: no Ray, MLflow or torch.distributed.

train.compile=true runs the same phases as one pure function under torch.compile: each
backward pass then returns its gradients (torch.autograd.grad, which the compiler traces)
instead of accumulating them into .grad (see `_backward`). One worker only: on GPUs DDP
all-reduces gradients as they are accumulated, which the compiled step's never are.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn

from vaegan.augment import augment
from vaegan.config import Config, OptimConfig
from vaegan.losses import (
    StepMetrics,
    attribute_bce,
    attribute_llike,
    equilibrium,
    gan_bce,
    generator_nonsaturating,
    kl_prior,
    llike_dis_l,
    llike_pixel,
)
from vaegan.model import VAEGAN, reparameterize


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; raised before any weight is touched."""


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps,
                                   weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                            weight_decay=cfg.weight_decay)


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls run in hardware: CUDA, or a CPU with AVX512-BF16 / AMX.
    Elsewhere (e.g. AVX2-only CPUs) bf16 is emulated and far slower than fp32."""
    if device.type == "cuda":
        return True
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def set_cuda_backends(device: torch.device, precision: str) -> None:
    """On CUDA: cuDNN picks its fastest kernels once for the step's fixed shapes, and fp32 is
    fp32. cuDNN's convolutions run in TF32 by default (torch's matmuls do not), which would
    make an fp32 step neither fp32 nor comparable with an fp32 matmul peak. `precision`: a
    resolved one (`resolve_precision`)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = precision != "fp32"


def precision_context(precision: str, device: torch.device):
    """bf16 autocast for precision "bf16" (a resolved precision), else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def decode(dec: nn.Module, z_in: torch.Tensor, b: int, decoder_bn: str) -> torch.Tensor:
    """[Dec(z); Dec(z_p)] from z_in = [z; z_p], z being the first b rows. loss.decoder_bn=joint:
    one forward, batch norm over both; separate: two forwards, as Algorithm 1 writes them, each
    normalised on its own statistics. Over the joint batch, codes that drift from N(0, I) shift
    x_p's normalisation and x~ and x_p part ways (Dis tells them apart by it): the mnist32 demo
    stalled so (docs/results.md#separate-decoder-batch-norm). The same FLOPs; one backward."""
    if decoder_bn == "joint":
        return dec(z_in)
    return torch.cat([dec(z_in[:b]), dec(z_in[b:])])


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


class TrainStep:
    """Owns the three optimizers and runs Algorithm 1 on a batch.

    The networks may be wrapped (DDP) by the caller; the step only calls them. In a
    distributed run `mean_across_ranks` averages the step's scalars over ranks once the
    gradients are in, before any optimizer steps, so every rank takes the same equilibrium
    decision and stops on the same non-finite term; it may exchange the gradients in the
    same collective (vaegan.distributed.exchange). Every rank runs the same backward passes.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, discriminator: nn.Module,
                 cfg: Config, device: torch.device | str = "cpu",
                 mean_across_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.enc, self.dec, self.dis = encoder, decoder, discriminator
        self.cfg = cfg
        self.device = torch.device(device)
        self.opt_enc = make_optimizer(_params(encoder), cfg.optim)
        self.opt_dec = make_optimizer(_params(decoder), cfg.optim)
        self.opt_dis = make_optimizer(_params(discriminator), cfg.optim)
        self.generator = torch.Generator(self.device).manual_seed(cfg.train.seed)
        self.mean_across_ranks = mean_across_ranks or (lambda t: t)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.step_count = 0
        self.progress: float | None = None
        """The share of the run done, where the caller knows better than step / train.steps
        (a time budget, train.minutes): the lr anneal follows it."""
        self._compiled = None
        if cfg.train.compile:
            if any(isinstance(n, nn.parallel.DistributedDataParallel)
                   for n in (encoder, decoder, discriminator)):
                # The compiled step returns its gradients instead of accumulating them, so
                # DDP's hooks (which fire on accumulation) would never all-reduce them.
                raise ValueError("train.compile=true runs on one worker only (DDP-wrapped "
                                 "networks given); set train.num_workers=1 or compile=false")
            self._compiled = torch.compile(self._gradients_as_values)

    @classmethod
    def for_model(cls, model: VAEGAN, cfg: Config, **kw) -> TrainStep:
        return cls(model.encoder, model.decoder, model.discriminator, cfg, model.device, **kw)

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"encoder": self.opt_enc, "decoder": self.opt_dec, "discriminator": self.opt_dis}

    # -- the step ------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, noise: tuple[torch.Tensor, torch.Tensor] | None = None,
                 attrs: torch.Tensor | None = None) -> StepMetrics:
        """One step of Algorithm 1 on images x (B, C, H, W) in [-1, 1]; `attrs` (B, A): their
        attribute labels, which loss.attribute_weight > 0 needs."""
        self._set_lr()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        metrics = self.compute_gradients(x, noise, attrs)
        mode = self.cfg.loss.mode
        if mode != "gan":
            self.opt_enc.step()  # theta_Enc <- theta_Enc - grad_Enc (L_prior + L_llike)
        if not metrics.skip_dec:
            self.opt_dec.step()  # theta_Dec <- theta_Dec - grad_Dec (gamma L_llike - L_GAN)
        if mode != "vae" and not metrics.skip_dis:
            self.opt_dis.step()  # theta_Dis <- theta_Dis - grad_Dis (L_GAN)
        self.step_count += 1
        return metrics

    def compute_gradients(self, x: torch.Tensor, noise: tuple[torch.Tensor, torch.Tensor] | None = None,
                          attrs: torch.Tensor | None = None) -> StepMetrics:
        """Fill each network's .grad with the gradient of its own objective; step nothing."""
        b = x.shape[0]
        if self.cfg.loss.attribute_weight > 0 and self.cfg.loss.mode != "vae":
            if attrs is None:
                raise ValueError("loss.attribute_weight > 0: the step needs the batch's attribute "
                                 "labels (attrs)")
            n = self.cfg.model.dis_attributes
            if tuple(attrs.shape) != (b, n):
                raise ValueError(f"attrs has shape {tuple(attrs.shape)}; Dis's attribute head takes "
                                 f"({b}, {n}): one label per image and attribute (model.dis_attributes)")
            attrs = attrs.to(self.device)
        else:
            attrs = None
        if noise is None:
            latent = self.cfg.model.latent_dim
            noise = tuple(torch.randn(b, latent, generator=self.generator, device=self.device)
                          for _ in range(2))
        eps, z_p = noise
        if self._compiled is None:
            terms = self._mode_fn()(x, eps, z_p, self._adversarial_weight(), attrs)
        else:
            with torch._dynamo.config.patch(trace_autograd_ops=True):  # trace autograd.grad
                terms, grads = self._compiled(x, eps, z_p, self._adversarial_weight(), attrs)
            for net, values in grads.items():  # accumulated, as the eager backward passes do
                for p, g in zip(_params(getattr(self, net)), values, strict=True):
                    p.grad = g if p.grad is None else p.grad + g
        return self._metrics(*terms)  # the one host sync, after every backward pass

    def _mode_fn(self):
        return {"vaegan": self._vaegan, "vae_dis_l": self._vaegan, "vae": self._vae,
                "gan": self._gan}[self.cfg.loss.mode]

    def _gradients_as_values(self, x: torch.Tensor, eps: torch.Tensor, z_p: torch.Tensor,
                             adv: torch.Tensor, attrs: torch.Tensor | None):
        """The step as a pure function for torch.compile: (loss terms, {net: gradients}).
        Everything is returned, nothing accumulated into .grad, and the terms are detached,
        so the compiled graph has no backward of its own and every gradient a phase does not
        use (e.g. Dis's weight gradient of L_llike) is dead code."""
        grads: dict[str, list[torch.Tensor]] = {}
        terms = self._mode_fn()(x, eps, z_p, adv, attrs, grads)
        return [t.detach() if t is not None else None for t in terms], grads

    def _autocast(self):
        return precision_context(self.precision, self.device)

    def _backward(self, tensors, grad_tensors, nets: tuple[str, ...], inputs=(),
                  retain_graph: bool = False, sink: dict | None = None) -> list[torch.Tensor]:
        """One backward traversal: the gradient into the parameters of `nets` and at the
        leaves `inputs` (returned). Eager (sink None): accumulated into .grad (where DDP's hooks,
        on GPUs, all-reduce it). Compiled: torch.autograd.grad (what torch.compile traces), the
        parameter gradients put into `sink` by network name."""
        params = [_params(getattr(self, n)) for n in nets]
        flat = [p for ps in params for p in ps]
        if sink is None:
            torch.autograd.backward(tensors, grad_tensors, inputs=[*flat, *inputs],
                                    retain_graph=retain_graph)
            return [t.grad for t in inputs]
        grads = torch.autograd.grad(tensors, [*flat, *inputs], grad_tensors,
                                    retain_graph=retain_graph)
        i = 0
        for n, ps in zip(nets, params, strict=True):
            sink[n] = list(grads[i:i + len(ps)])
            i += len(ps)
        return list(grads[i:])

    def _vaegan(self, x: torch.Tensor, eps: torch.Tensor, z_p: torch.Tensor, adv: torch.Tensor,
                attrs: torch.Tensor | None = None, sink: dict | None = None):
        """VAE/GAN, and VAE_Dis_l (mode=vae_dis_l): the same networks and passes, but the
        decoder's objective is L_llike alone; Dis still learns L_GAN, which shapes Dis_l."""
        L, b = self.cfg.loss, x.shape[0]
        adversarial = L.mode == "vaegan"
        with self._autocast():
            mu, log_var = self.enc(x)
            z = reparameterize(mu.float(), log_var.float(), eps)
            # Gradient stop: Dec's backward reaches Enc only through g_z, routed below, so
            # the GAN loss can never update the encoder.
            z_in = torch.cat([z, z_p]).detach().requires_grad_()
            fake = decode(self.dec, z_in, b, L.decoder_bn)  # [x~; x_p], (2B, C, H, W)
            # Gradient stop: Dis's backward ends at its input, so Dec can be sent a gradient
            # of its own (a*g_ll - b*g_gan) rather than Dis's.
            fake_in = fake.detach().requires_grad_()
            # one Dis forward, (3B,); augmented (loss.augment) with x~ transformed as x is
            logits, feats, attr_logits = self._dis(self._augment(torch.cat([x, fake_in]), paired=b),
                                                   attrs is not None)
        logit_real, logit_recon, logit_prior = logits.split(b)
        feats_real, feats_recon, _ = feats.split(b)
        kl = kl_prior(mu.float(), log_var.float())
        # Dis_l(x) is the target of the Gaussian observation model: a constant for the
        # step, so no gradient flows through it.
        ll = llike_dis_l(feats_real.detach(), feats_recon)
        if attrs is not None and L.attribute_llike:  # and Dis's attribute reading of x~ vs of x
            ll = ll + L.attribute_llike * attribute_llike(attr_logits[b:2 * b], attr_logits[:b])
        # recipe=reference: the authors' Dis loss leaves x~ out.
        gan = gan_bce(logit_real, logit_recon if L.recipe == "paper" else None, logit_prior)
        attr = attribute_bce(attr_logits[:b], attrs) if attrs is not None else None
        terms = (kl, ll, torch.zeros((), device=self.device), gan, logit_real, logit_recon, logit_prior, attr)

        # (1) L_llike -> gradient at the fakes through Dis's first l layers only (all of Dis
        #     with loss.attribute_llike). Dis's weights receive nothing: Dis_l is a fixed
        #     metric for the VAE terms.
        (g_ll,) = torch.autograd.grad(ll, fake_in, retain_graph=True)
        # (2) L_GAN (+ the attribute BCE) -> Dis's weights (descend the BCE) and, for
        #     minimax Dec, the BCE's gradient at the fakes, in one traversal of Dis.
        ns = L.generator == "nonsaturating"
        if not adversarial:  # VAE_Dis_l: Dis's weights only; Dec needs no GAN gradient
            self._backward(self._dis_loss(gan, attr), None, ("dis",), sink=sink)
            g_dec = g_ll  # gamma weighs content against style: here there is no style
        else:
            g_gan = self._dis_backward(gan, attr, fake_in, ns, sink)
            if ns:  # Dec descends -log Dis(fake) over the fakes the GAN loss uses
                fakes = torch.cat([logit_recon, logit_prior]) if L.recipe == "paper" else logit_prior
                (g_adv,) = torch.autograd.grad(generator_nonsaturating(fakes), fake_in)
            else:  # minimax: Dec ascends the BCE, i.e. minus Dis's gradient at the fakes
                g_adv = -g_gan
            a, c = (L.gamma, 1.0) if L.recipe == "paper" else (L.w, 1.0 - L.w)
            c = c * adv  # loss.adversarial_warmup: ramps from 0 to 1
            g_dec = a * g_ll + c * g_adv
        # (3) Dec: gamma * grad L_llike - grad L_GAN (recipe=reference: w and 1 - w).
        self._backward(fake, g_dec, ("dec",), retain_graph=True, sink=sink)
        # (4) Enc: grad (L_prior + L_llike), L_prior weighted by loss.kl_weight (1: the paper).
        #     g_ll goes back through Dec to z (input gradient only; Dec's weights are done),
        #     then through the reparameterisation into Enc.
        (g_z,) = torch.autograd.grad(fake, z_in, g_ll)
        self._backward([kl, z], [torch.full_like(kl, L.kl_weight), g_z[:b]], ("enc",), sink=sink)
        return terms

    def _vae(self, x: torch.Tensor, eps: torch.Tensor, z_p: torch.Tensor, adv: torch.Tensor,
             attrs: torch.Tensor | None = None, sink: dict | None = None):
        """The paper's baseline: a VAE with a pixel-wise Gaussian error; Enc and Dec both
        descend L_prior + L_llike^pixel. Dis is not used."""
        with self._autocast():
            mu, log_var = self.enc(x)
            x_recon = self.dec(reparameterize(mu.float(), log_var.float(), eps))
        kl = kl_prior(mu.float(), log_var.float())
        ll = llike_pixel(x, x_recon)
        zero = torch.zeros((), device=self.device)
        terms = (kl, zero, ll, zero, None, None, None, None)
        self._backward(self.cfg.loss.kl_weight * kl + ll, None, ("enc", "dec"), sink=sink)
        return terms

    def _gan(self, x: torch.Tensor, eps: torch.Tensor, z_p: torch.Tensor, adv: torch.Tensor,
             attrs: torch.Tensor | None = None, sink: dict | None = None):
        """The paper's GAN baseline: no encoder; Dis on [x; x_p]."""
        L, b = self.cfg.loss, x.shape[0]
        with self._autocast():
            x_p = self.dec(z_p)
            fake_in = x_p.detach().requires_grad_()  # gradient stop: Dec gets g_adv below
            logits, _, attr_logits = self._dis(self._augment(torch.cat([x, fake_in])), attrs is not None)
        logit_real, logit_prior = logits.split(b)
        gan = gan_bce(logit_real, None, logit_prior)
        zero = torch.zeros((), device=self.device)
        attr = attribute_bce(attr_logits[:b], attrs) if attrs is not None else None
        terms = (zero, zero, zero, gan, logit_real, None, logit_prior, attr)
        ns = L.generator == "nonsaturating"
        g_gan = self._dis_backward(gan, attr, fake_in, ns, sink)
        if ns:
            (g_adv,) = torch.autograd.grad(generator_nonsaturating(logit_prior), fake_in)
        else:
            g_adv = -g_gan
        self._backward(x_p, g_adv, ("dec",), sink=sink)
        return terms

    # -- helpers -------------------------------------------------------------------------

    def _dis(self, images: torch.Tensor, with_attributes: bool):
        """Dis(images) -> (logits, Dis_l, attribute logits or None)."""
        if with_attributes:
            return self.dis(images, with_attributes=True)
        return (*self.dis(images), None)

    def _dis_loss(self, gan: torch.Tensor, attr: torch.Tensor | None) -> torch.Tensor:
        """What Dis descends: L_GAN, plus the attribute head's BCE (loss.attribute_weight)."""
        return gan if attr is None else gan + self.cfg.loss.attribute_weight * attr

    def _dis_backward(self, gan: torch.Tensor, attr: torch.Tensor | None, fake_in: torch.Tensor,
                      nonsaturating: bool, sink: dict | None) -> torch.Tensor | None:
        """Dis's loss -> Dis's weights; for minimax Dec, in the same traversal, L_GAN's
        gradient at the fakes (what Dec ascends; None for nonsaturating Dec, which takes its
        own). The attribute BCE is taken on real images only, but batch norm over the
        concatenated batch carries a little of its gradient to the fakes too; that part is
        Dis's business, not Dec's, so it is taken out (an extra input-gradient pass)."""
        loss = self._dis_loss(gan, attr)
        if nonsaturating:  # the graph stays for Dec's own -log Dis(fake)
            self._backward(loss, None, ("dis",), retain_graph=True, sink=sink)
            return None
        g_attr = None
        if attr is not None:
            (g_attr,) = torch.autograd.grad(self.cfg.loss.attribute_weight * attr, fake_in,
                                            retain_graph=True)
        (g,) = self._backward(loss, None, ("dis",), [fake_in], sink=sink)
        return g if g_attr is None else g - g_attr

    def _adversarial_weight(self) -> torch.Tensor:
        """The adversarial term's weight in Dec's gradient at this step (loss.adversarial_warmup:
        0 at the first step, 1 from `warmup` steps on). A tensor: the compiled step takes it
        as an input rather than compiling again for every value."""
        warmup = self.cfg.loss.adversarial_warmup
        # a fill on the device: a copy from the host would wait for the previous step's kernels
        return torch.full((), min(1.0, self.step_count / warmup) if warmup else 1.0, device=self.device)

    def _augment(self, images: torch.Tensor, paired: int = 0) -> torch.Tensor:
        """Dis's input through loss.augment (vaegan.augment; drawn from the step's generator)."""
        policy = self.cfg.loss.augment_policy
        return augment(images, policy, paired, self.generator) if policy else images

    def _metrics(self, kl, ll_dis, ll_pix, gan, logit_real, logit_recon,
                 logit_prior, attr) -> StepMetrics:
        """All scalars in one host sync, averaged over ranks (`mean_across_ranks`, after the
        backward passes); raises on a non-finite term; applies the equilibrium rule (on the
        averaged costs, so all ranks agree)."""
        def d(logit):  # mean Dis(.) = mean sigmoid(logit)
            return torch.sigmoid(logit.detach().float()).mean() if logit is not None else zero

        zero = torch.zeros((), device=self.device)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        costs = torch.stack([  # real_cost = mean -log Dis(x); fake_cost = mean -log(1-Dis(x_p))
            bce(logit_real.detach().float(), torch.ones_like(logit_real, dtype=torch.float32))
            if logit_real is not None else zero,
            bce(logit_prior.detach().float(), torch.zeros_like(logit_prior, dtype=torch.float32))
            if logit_prior is not None else zero,
        ])
        terms = torch.stack([t.detach().float().to(self.device) if t is not None else zero
                             for t in (kl, ll_dis, ll_pix, gan, attr)])
        scalars = self.mean_across_ranks(torch.cat([
            terms, torch.stack([d(logit_real), d(logit_recon), d(logit_prior)]), costs])).tolist()
        kl_, ll_dis_, ll_pix_, gan_, attr_, d_real, d_recon, d_prior, real_cost, fake_cost = scalars
        for name, value in (("kl_prior", kl_), ("llike_dis_l", ll_dis_),
                            ("llike_pixel", ll_pix_), ("gan_bce", gan_), ("attribute_bce", attr_)):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"loss term {name} is {value} at step {self.step_count} "
                    "(try a lower optim.lr, or loss.gamma; no weights were updated)")
        skip_dis = skip_dec = False
        L = self.cfg.loss
        if L.use_equilibrium and L.mode != "vae":
            skip_dis, skip_dec = equilibrium(real_cost, fake_cost, L.equilibrium_target,
                                             L.equilibrium_margin)
            skip_dec = skip_dec and L.mode != "vae_dis_l"  # its Dec plays no game to pause
        return StepMetrics(loss=kl_ + ll_dis_ + ll_pix_ + gan_, kl_prior=kl_,
                           llike_dis_l=ll_dis_, llike_pixel=ll_pix_, gan_bce=gan_,
                           d_real=d_real, d_recon=d_recon, d_prior=d_prior,
                           skip_dis=float(skip_dis), skip_dec=float(skip_dec), attribute_bce=attr_)

    def _set_lr(self) -> None:
        """Geometric anneal from optim.lr to optim.lr_final over train.steps, or over
        `progress` when the caller sets it (if lr_final is set)."""
        o = self.cfg.optim
        if o.lr_final <= 0:
            return
        frac = self.progress
        if frac is None:
            frac = min(1.0, self.step_count / max(1, self.cfg.train.steps))
        lr = o.lr * (o.lr_final / o.lr) ** frac
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"step": self.step_count, "generator": self.generator.get_state(),
                **{f"opt_{k}": v.state_dict() for k, v in self.optimizers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        # A checkpoint of another device type (CPU <-> CUDA) holds another generator's state
        # (5,056 against 16 bytes), which set_state refuses; the loop reseeds the generator
        # before every step (`noise_seed`), so there it is only skipped.
        if state["generator"].numel() == self.generator.get_state().numel():
            self.generator.set_state(state["generator"])
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state[f"opt_{k}"])
