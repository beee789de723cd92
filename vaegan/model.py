"""The VAE/GAN networks of Larsen et al. 2016, Table 1 (all convs 5x5; BN = batch norm).

    Enc(x) -> (mu, log_var)        z = mu + exp(log_var / 2) * eps,  eps ~ N(0, I)
    Dec(z) -> x_tilde              also the GAN generator: x_p = Dec(z_p), z_p ~ N(0, I)
    Dis(x) -> (logit, Dis_l(x))    Dis_l = a hidden conv's output, before its BN and ReLU

At 64x64 (the paper) every network has three stride-2 stages and an 8x8 bottleneck; at
32x32 one stage is removed and at 128x128 one is added, so the bottleneck stays 8x8 and
Dis_l keeps its paper meaning (the last conv: the 4th at 64x64). Single device; no Ray,
MLflow or torch.distributed here.

Not in the paper: Dis's optional attribute head (model.dis_attributes; an AC-GAN head,
Odena et al. 2017, trained by loss.attribute_weight), and `LatentMixture`, a Gaussian
mixture over the encoder's codes fitted after training (model.latent_mixture; Ghosh et al.
2020), as a second source of z_p for sampling.
"""

from __future__ import annotations

import torch
from torch import nn

from vaegan.config import LATENTS, ModelConfig

# Channels of the stride-2 stages per image size; the 64 rows are Table 1 exactly.
ENC_CHANNELS = {32: [128, 256], 64: [64, 128, 256], 128: [32, 64, 128, 256]}
DEC_CHANNELS = {32: [256, 64], 64: [256, 128, 32], 128: [256, 128, 64, 32]}
DIS_CHANNELS = {32: [128, 256], 64: [128, 256, 256], 128: [64, 128, 256, 256]}
DIS_FIRST = 32  # the stride-1 conv that opens Dis (no BN)
BOTTLENECK = 8  # spatial size after the stride-2 stages
LOG_VAR_RANGE = (-30.0, 20.0)  # exp(log_var) stays finite in fp32 and bf16


def _w(c: int, width: float) -> int:
    return max(1, round(c * width))


def conv(cin: int, cout: int, stride: int) -> nn.Conv2d:
    # 5x5 everywhere (Table 1); padding 2 so stride 2 exactly halves the size. No bias
    # where a BN follows would be tidier, but Table 1 does not say, and the bias is cheap.
    return nn.Conv2d(cin, cout, 5, stride=stride, padding=2)


def deconv(cin: int, cout: int) -> nn.ConvTranspose2d:
    # 5x5, stride 2, exactly doubles the size.
    return nn.ConvTranspose2d(cin, cout, 5, stride=2, padding=2, output_padding=1)


def conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(conv(cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """x (B, C, H, W) in [-1, 1] -> mu, log_var (B, latent_dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        chans = [_w(c, cfg.width) for c in ENC_CHANNELS[cfg.image_size]]
        layers, cin = [], cfg.channels
        for c in chans:  # conv s2, BN, ReLU per stage
            layers.append(conv_bn_relu(cin, c, 2))
            cin = c
        self.convs = nn.Sequential(*layers)
        fc = _w(cfg.enc_fc, cfg.width)
        self.fc = nn.Sequential(  # FC 2048, BN, ReLU
            nn.Flatten(), nn.Linear(cin * BOTTLENECK**2, fc), nn.BatchNorm1d(fc), nn.ReLU(True))
        self.mu = nn.Linear(fc, cfg.latent_dim)
        self.log_var = nn.Linear(fc, cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(self.convs(x))  # (B, enc_fc)
        # Clamped: exp(log_var) overflowing to inf is the classic VAE NaN (docs/method.md#pitfalls).
        return self.mu(h), self.log_var(h).clamp(*LOG_VAR_RANGE)


class Decoder(nn.Module):
    """z (B, latent_dim) -> image (B, C, H, W) in [-1, 1] (tanh). Also the GAN generator."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        chans = [_w(c, cfg.width) for c in DEC_CHANNELS[cfg.image_size]]
        self.c0 = _w(256, cfg.width)
        self.fc = nn.Sequential(  # FC 8*8*256, BN, ReLU
            nn.Linear(cfg.latent_dim, self.c0 * BOTTLENECK**2),
            nn.BatchNorm1d(self.c0 * BOTTLENECK**2), nn.ReLU(True))
        layers, cin = [], self.c0
        for c in chans:  # deconv s2, BN, ReLU per stage
            layers += [deconv(cin, c), nn.BatchNorm2d(c), nn.ReLU(True)]
            cin = c
        self.deconvs = nn.Sequential(*layers)
        self.out = conv(cin, cfg.channels, 1)  # conv 3 (or 1), tanh

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], self.c0, BOTTLENECK, BOTTLENECK)  # (B, 256, 8, 8)
        return torch.tanh(self.out(self.deconvs(h)))


class Discriminator(nn.Module):
    """x (B, C, H, W) -> (logit (B,), Dis_l(x) (B, c_l, h_l, w_l)).

    Returns the logit, not the sigmoid: BCE-with-logits is the numerically stable form of
    log Dis(x) and log(1 - Dis(x)). With model.dis_attributes = A > 0, `with_attributes=True`
    also returns A attribute logits (B, A) from a second head on the same hidden FC.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        chans = [_w(c, cfg.width) for c in DIS_CHANNELS[cfg.image_size]]
        first = _w(DIS_FIRST, cfg.width)
        # convs[i] is the (i+1)-th conv; post[i] is what follows it (BN? then ReLU).
        self.convs = nn.ModuleList([conv(cfg.channels, first, 1)])
        self.post = nn.ModuleList([nn.ReLU()])  # conv 32, ReLU (no BN on the first layer)
        cin = first
        for c in chans:
            self.convs.append(conv(cin, c, 2))
            self.post.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()))
            cin = c
        n = len(self.convs)
        self.dis_layer = n if cfg.dis_layer == -1 else cfg.dis_layer  # 1-based
        fc = _w(cfg.dis_fc, cfg.width)
        self.fc = nn.Sequential(  # FC 512, BN, ReLU; FC 1 (sigmoid folded into the loss)
            nn.Flatten(), nn.Linear(cin * BOTTLENECK**2, fc), nn.BatchNorm1d(fc), nn.ReLU(),
            nn.Linear(fc, 1))
        self.attributes = nn.Linear(fc, cfg.dis_attributes) if cfg.dis_attributes else None

    def forward(self, x: torch.Tensor, with_attributes: bool = False):
        h, feats = x, None
        for i, (conv_, post) in enumerate(zip(self.convs, self.post, strict=True), start=1):
            h = conv_(h)
            if i == self.dis_layer:
                feats = h  # Dis_l: this conv's output, before its BN and ReLU
            h = post(h)
        if not with_attributes:
            return self.fc(h).squeeze(1), feats
        if self.attributes is None:
            raise ValueError("this discriminator has no attribute head (model.dis_attributes=0)")
        hidden = self.fc[:-1](h)  # the FC's hidden layer, shared by both heads
        return self.fc[-1](hidden).squeeze(1), feats, self.attributes(hidden)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Dis_l(x) alone, running only the first l layers."""
        h = x
        for i, (conv_, post) in enumerate(zip(self.convs, self.post, strict=True), start=1):
            h = conv_(h)
            if i == self.dis_layer:
                return h
            h = post(h)
        raise AssertionError("unreachable")  # pragma: no cover


def init_weights(module: nn.Module) -> None:
    """DCGAN initialisation (Radford et al. 2016): N(0, 0.02) weights, BN scale N(1, 0.02)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def reparameterize(mu: torch.Tensor, log_var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps (Kingma & Welling 2014), sigma = exp(log_var / 2)."""
    return mu + torch.exp(0.5 * log_var) * eps


class LatentMixture(nn.Module):
    """p(z) = sum_k pi_k N(mean_k, L_k L_k^T): a density over the codes the encoder gives
    real images, fitted after training (vaegan.latent). The prior N(0, I) also covers the
    gaps between the clusters of those codes (one per digit, say), and the decoder turns a
    gap into a blend of its neighbours; drawing z_p from this mixture instead stays on the
    codes the decoder learned to reconstruct. Buffers only: it travels in model.pt, and no
    optimizer, DDP or EMA touches it."""

    def __init__(self, components: int, latent_dim: int):
        super().__init__()
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("weights", torch.full((components,), 1.0 / components))
        self.register_buffer("means", torch.zeros(components, latent_dim))
        self.register_buffer("scale_tril", torch.eye(latent_dim).repeat(components, 1, 1))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, latent_dim) codes: a component by its weight, then mean_k + L_k eps."""
        if not bool(self.fitted):
            raise ValueError("the latent mixture has not been fitted (vaegan.latent.fit_mixture)")
        # drawn where the generator lives (a seed gives the same codes on any device)
        dev = generator.device if generator is not None else self.means.device
        k = torch.multinomial(self.weights.to(dev, torch.float32), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], 1, generator=generator, device=dev)
        z = self.means.to(dev)[k] + (self.scale_tril.to(dev)[k] @ eps).squeeze(-1)
        return z.to(self.means.device)


class VAEGAN(nn.Module):
    """The three networks, plus the inference-side methods users call."""

    def __init__(self, cfg: ModelConfig, encoder: nn.Module | None = None, decoder: nn.Module | None = None,
                 discriminator: nn.Module | None = None):
        """New, initialised networks; or those given (e.g. the averaged ones of vaegan.ema)."""
        super().__init__()
        self.cfg = cfg
        built = [Encoder(cfg) if encoder is None else None, Decoder(cfg) if decoder is None else None,
                 Discriminator(cfg) if discriminator is None else None]
        for net in built:
            # On the meta device a net is built only to take loaded weights (assign=True): no
            # values to draw, and normal_ there would import torch's compiler (a second).
            if net is not None and not next(net.parameters()).is_meta:
                net.apply(init_weights)
        self.encoder = encoder if encoder is not None else built[0]
        self.decoder = decoder if decoder is not None else built[1]
        self.discriminator = discriminator if discriminator is not None else built[2]
        self.latent_mixture = (LatentMixture(cfg.latent_mixture, cfg.latent_dim) if cfg.latent_mixture
                               else None)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def check_images(self, x: torch.Tensor) -> None:
        c, s = self.cfg.channels, self.cfg.image_size
        if x.ndim != 4 or x.shape[1:] != (c, s, s):
            raise ValueError(f"images must have shape (B, {c}, {s}, {s}); got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] -> (mu, log_var), each (B, latent_dim)."""
        self.check_images(x)
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_dim) -> images in [-1, 1]."""
        if z.ndim != 2 or z.shape[1] != self.cfg.latent_dim:
            raise ValueError(f"z must have shape (B, {self.cfg.latent_dim}); got {tuple(z.shape)}")
        return self.decoder(z)

    def load_weights(self, state_dict: dict) -> None:
        """load_state_dict, strict except for the latent mixture: a checkpoint from before
        model.latent_mixture was turned on (or off) resumes, and the mixture is refitted at
        the next checkpoint."""
        theirs = state_dict.get("discriminator.attributes.weight")
        ours = self.discriminator.attributes
        n_theirs = 0 if theirs is None else theirs.shape[0]
        n_ours = 0 if ours is None else ours.out_features
        if n_theirs != n_ours:  # a strict load would only list the keys
            raise ValueError(f"these weights have a discriminator attribute head of {n_theirs} outputs "
                             f"and this model one of {n_ours} (model.dis_attributes; 0: none): resume with "
                             "the loss.attribute_weight and shards the run was trained with, or start "
                             "a new run (another train.name)")
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        wrong = [k for k in (*missing, *unexpected) if not k.startswith("latent_mixture.")]
        if wrong:  # the same message as a strict load's
            self.load_state_dict(state_dict)

    @property
    def has_mixture(self) -> bool:
        """Whether sample(latent="mixture") can draw: a LatentMixture that has been fitted."""
        return self.latent_mixture is not None and bool(self.latent_mixture.fitted)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, latent: str = "prior") -> torch.Tensor:
        """n images Dec(z_p): z_p ~ N(0, I) (the paper), or from the fitted LatentMixture
        (latent="mixture"; "auto" takes it when there is one)."""
        if latent not in LATENTS:
            raise ValueError(f"latent={latent!r} is not allowed; choose one of: {', '.join(LATENTS)}")
        if latent == "mixture" or (latent == "auto" and self.has_mixture):
            if not self.has_mixture:
                raise ValueError("latent='mixture' needs a model trained with model.latent_mixture > 0; "
                                 "this one has no fitted mixture (trained without model.latent_mixture; "
                                 "use latent='prior')")
            return self.decode(self.latent_mixture.sample(n, generator))
        # drawn where the generator lives, as the mixture's codes are
        dev = generator.device if generator is not None else self.device
        z = torch.randn(n, self.cfg.latent_dim, generator=generator, device=dev)
        return self.decode(z.to(self.device))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Dec(mu(x)): the posterior mean decoded (the usual deterministic reconstruction)."""
        mu, _ = self.encode(x)
        return self.decode(mu)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def dis_l_shape(cfg: ModelConfig) -> tuple[int, int, int]:
    """(channels, height, width) of Dis_l for a config (the paper: 256 x 8 x 8 at 64x64)."""
    n_convs = 1 + len(DIS_CHANNELS[cfg.image_size])
    layer = n_convs if cfg.dis_layer == -1 else cfg.dis_layer
    if layer == 1:
        return _w(DIS_FIRST, cfg.width), cfg.image_size, cfg.image_size
    size = cfg.image_size // 2 ** (layer - 1)
    return _w(DIS_CHANNELS[cfg.image_size][layer - 2], cfg.width), size, size

