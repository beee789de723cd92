"""Algorithm 1's gradient routing, checked against each network's own objective computed
the plain way (one full graph, differentiated w.r.t. that network alone)."""

import copy

import pytest
import torch

from vaegan.augment import augment
from vaegan.losses import (
    attribute_bce,
    attribute_llike,
    gan_bce,
    generator_nonsaturating,
    kl_prior,
    llike_dis_l,
    llike_pixel,
)
from vaegan.model import VAEGAN, reparameterize
from vaegan.step import NonFiniteLossError, TrainStep


def make(cfg, **loss):
    for k, v in loss.items():
        setattr(cfg.loss, k, v)
    model = VAEGAN(cfg.model)
    return model, TrainStep.for_model(model, cfg)


def batch(cfg, n=8):
    m = cfg.model
    return torch.rand(n, m.channels, m.image_size, m.image_size) * 2 - 1


def noise(cfg, n=8):
    return torch.randn(n, cfg.model.latent_dim), torch.randn(n, cfg.model.latent_dim)


def costs_of(real_cost, fake_cost):
    """A stand-in for the cross-rank averaging of the step's scalars (`mean_across_ranks`)
    whose equilibrium costs (the last two) are these."""
    return lambda scalars: torch.cat([scalars[:-2], torch.tensor((real_cost, fake_cost))])


def grads(module):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for p in module.parameters()]


def decode(dec, z, z_p, cfg):
    """[Dec(z); Dec(z_p)]: one forward over both (loss.decoder_bn=joint), or two (separate)."""
    return dec(torch.cat([z, z_p])) if cfg.loss.decoder_bn == "joint" else torch.cat([dec(z), dec(z_p)])


def own_objectives(model, cfg, x, eps, z_p, augment_seed=None, adv=1.0, attrs=None):
    """Each network's objective from one plain full graph (no detaches but the Dis_l(x)
    target), differentiated w.r.t. that network only. `augment_seed`: Dis sees its inputs
    through loss.augment, drawn from a generator with that seed; `adv`: the adversarial
    term's weight (loss.adversarial_warmup); `attrs`: the real images' labels, for Dis's
    attribute head (loss.attribute_weight)."""
    L, b = cfg.loss, x.shape[0]
    enc, dec, dis = model.encoder, model.decoder, model.discriminator
    mu, log_var = enc(x)
    z = reparameterize(mu, log_var, eps)
    fake = decode(dec, z, z_p, cfg)
    dis_in = torch.cat([x, fake])
    if augment_seed is not None:
        dis_in = augment(dis_in, L.augment_policy, b, torch.Generator().manual_seed(augment_seed))
    if attrs is None:
        logits, feats = dis(dis_in)
    else:
        logits, feats, attr_logits = dis(dis_in, with_attributes=True)
    lr, lt, lp = logits.split(b)
    fr, ft, _ = feats.split(b)
    kl = kl_prior(mu, log_var)
    ll = llike_dis_l(fr.detach(), ft)
    if attrs is not None:  # Dis's attribute reading of x~ against its reading of x, a constant
        ll = ll + L.attribute_llike * attribute_llike(attr_logits[b:2 * b], attr_logits[:b].detach())
    paper = L.recipe == "paper"
    gan = gan_bce(lr, lt if paper else None, lp)
    # Dis alone descends the attribute BCE of the real images; Dec's minimax term is L_GAN only.
    dis_obj = gan if attrs is None else gan + L.attribute_weight * attribute_bce(attr_logits[:b], attrs)
    a, c = (L.gamma, adv) if paper else (L.w, (1 - L.w) * adv)
    if L.mode == "vae_dis_l":
        dec_obj = ll  # VAE_Dis_l: no adversarial term for Dec (and nothing for gamma to weigh)
    elif L.generator == "minimax":
        dec_obj = a * ll - c * gan  # Dec ascends the BCE
    else:
        dec_obj = a * ll + c * generator_nonsaturating(torch.cat([lt, lp]) if paper else lp)

    def g(obj, module):
        return list(torch.autograd.grad(obj, list(module.parameters()), retain_graph=True,
                                        allow_unused=True))
    return {"encoder": g(L.kl_weight * kl + ll, enc), "decoder": g(dec_obj, dec),
            "discriminator": g(dis_obj, dis)}


def assert_grads_close(actual, expected, name):
    # The floor scales with the network's largest gradient: a conv bias before batch norm has
    # a true gradient of 0, and what is computed is the rounding of sums that cancel, whose
    # size follows the layer's gradients and the summation order (1 thread or 2 differ).
    scale = max((float(e.abs().max()) for e in expected if e is not None), default=1.0)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        e = torch.zeros_like(a) if e is None else e
        torch.testing.assert_close(a, e, rtol=2e-4, atol=2e-6 * max(1.0, scale),
                                   msg=lambda m, i=i: f"{name} param {i}: {m}")


@pytest.mark.parametrize("decoder_bn", ["joint", "separate"])
@pytest.mark.parametrize("recipe", ["paper", "reference"])
@pytest.mark.parametrize("generator", ["minimax", "nonsaturating"])
@pytest.mark.parametrize("mode", ["vaegan", "vae_dis_l"])
def test_each_network_gets_exactly_its_own_gradient(debug_cfg, recipe, generator, mode, decoder_bn):
    """VAE/GAN, and the paper's VAE_Dis_l baseline (Enc and Dis as in VAE/GAN, Dec descends
    L_llike only); the decoder's batch norm over [z; z_p] or over each (loss.decoder_bn)."""
    debug_cfg.loss.decoder_bn = decoder_bn
    # gamma and w of order 1 so both parts of the decoder's gradient are visible
    model, step = make(debug_cfg, mode=mode, recipe=recipe, generator=generator, gamma=0.3, w=0.4)
    x, (eps, z_p) = batch(debug_cfg), noise(debug_cfg)
    reference_model = copy.deepcopy(model)
    step.compute_gradients(x, (eps, z_p))
    expected = own_objectives(reference_model, debug_cfg, x, eps, z_p)
    for name in ("encoder", "decoder", "discriminator"):
        assert_grads_close(grads(getattr(model, name)), expected[name], name)


@pytest.mark.parametrize("generator", ["minimax", "nonsaturating"])
def test_augmented_dis_inputs_and_the_warmup_route_like_their_objectives(debug_cfg, generator):
    """loss.augment: every network's objective is taken on Dis's augmented inputs (x~ with
    x's draws); loss.adversarial_warmup=4 at step 1: Dec's adversarial weight is 1/4;
    loss.kl_weight=0.5: Enc descends 0.5 L_prior + L_llike."""
    model, step = make(debug_cfg, generator=generator, gamma=0.3, augment="color,translation,cutout",
                       adversarial_warmup=4, kl_weight=0.5)
    step.step_count = 1
    x, (eps, z_p) = batch(debug_cfg), noise(debug_cfg)
    reference_model = copy.deepcopy(model)
    step.generator.manual_seed(11)
    step.compute_gradients(x, (eps, z_p))
    expected = own_objectives(reference_model, debug_cfg, x, eps, z_p, augment_seed=11, adv=0.25)
    for name in ("encoder", "decoder", "discriminator"):
        assert_grads_close(grads(getattr(model, name)), expected[name], name)
    # The augmentation changes what Dis is trained on: the same step without it differs.
    plain = own_objectives(reference_model, debug_cfg, x, eps, z_p, adv=0.25)["discriminator"]
    assert max(float((a - e).abs().max()) for a, e in zip(grads(model.discriminator), plain, strict=True)
               if e is not None) > 1e-4


@pytest.mark.parametrize("attribute_llike", [0.0, 2.0])
@pytest.mark.parametrize("generator", ["minimax", "nonsaturating"])
@pytest.mark.parametrize("mode", ["vaegan", "vae_dis_l"])
def test_the_attribute_head_trains_dis_alone(debug_cfg, generator, mode, attribute_llike):
    """loss.attribute_weight: Dis descends L_GAN + weight * BCE(attributes of x); Enc and Dec
    get exactly their objectives without it: the labels reach Dis only, even through the
    batch norm that couples x with the fakes in Dis's batch (minimax Dec ascending Dis's
    whole loss would fail this on 99% of the decoder's first weights). loss.attribute_llike:
    L_llike also holds the head's reading of x~ against that of x (Enc and Dec descend it)."""
    debug_cfg.model.dis_attributes = 3
    model, step = make(debug_cfg, mode=mode, generator=generator, gamma=0.3, attribute_weight=5.0,
                       attribute_llike=attribute_llike)
    x, (eps, z_p) = batch(debug_cfg), noise(debug_cfg)
    attrs = (torch.rand(len(x), 3) > 0.5).float() * 2 - 1  # CelebA's 1/-1
    reference_model = copy.deepcopy(model)
    m = step.compute_gradients(x, (eps, z_p), attrs)
    expected = own_objectives(reference_model, debug_cfg, x, eps, z_p, attrs=attrs)
    for name in ("encoder", "decoder", "discriminator"):
        assert_grads_close(grads(getattr(model, name)), expected[name], name)
    assert m.attribute_bce > 0 and model.discriminator.attributes.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="attribute labels"):
        step.compute_gradients(x, (eps, z_p))


def test_the_attribute_head_in_the_gan_baseline(debug_cfg):
    """mode=gan, minimax: Dis descends L_GAN + weight * BCE(attributes of x), Dec ascends
    L_GAN alone."""
    debug_cfg.model.dis_attributes = 2
    model, step = make(debug_cfg, mode="gan", attribute_weight=3.0)
    x, (_, z_p) = batch(debug_cfg), noise(debug_cfg)
    attrs = (torch.rand(len(x), 2) > 0.5).float()
    ref = copy.deepcopy(model)
    step.compute_gradients(x, (torch.zeros_like(z_p), z_p), attrs)
    logits, _, attr_logits = ref.discriminator(torch.cat([x, ref.decoder(z_p)]), with_attributes=True)
    gan = gan_bce(logits[:len(x)], None, logits[len(x):])
    dis_obj = gan + 3.0 * attribute_bce(attr_logits[:len(x)], attrs)
    assert_grads_close(grads(model.discriminator), torch.autograd.grad(
        dis_obj, list(ref.discriminator.parameters()), retain_graph=True), "discriminator")
    assert_grads_close(grads(model.decoder), torch.autograd.grad(-gan, list(ref.decoder.parameters())),
                       "decoder")


def test_the_equilibrium_rule_never_pauses_the_vae_dis_l_decoder(debug_cfg):
    """Its decoder plays no game: the rule may pause its Dis, never its Dec."""
    model, _ = make(debug_cfg, mode="vae_dis_l", equilibrium=True)
    step = TrainStep.for_model(model, debug_cfg, mean_across_ranks=costs_of(0.68, 1.2))
    assert step(batch(debug_cfg)).skip_dec == 0
    debug_cfg.loss.mode = "vaegan"  # the same costs pause a VAE/GAN decoder
    assert TrainStep.for_model(model, debug_cfg, mean_across_ranks=costs_of(0.68, 1.2)
                               )(batch(debug_cfg)).skip_dec == 1


def test_gan_loss_never_reaches_the_encoder(debug_cfg):
    """Changing Dis's head changes L_GAN but neither L_prior nor L_llike (Dis_l sits below
    the head): the encoder's gradient must not move by a single bit."""
    model, step = make(debug_cfg, gamma=0.3)
    x, nz = batch(debug_cfg), noise(debug_cfg)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.discriminator.fc[-1].weight.mul_(-3.0).add_(0.1)
    step.compute_gradients(x, nz)
    other_step = TrainStep.for_model(other, debug_cfg)
    other_step.compute_gradients(x, nz)
    assert not torch.equal(model.discriminator.fc[-1].weight.grad,
                           other.discriminator.fc[-1].weight.grad)
    for a, b in zip(grads(model.encoder), grads(other.encoder), strict=True):
        assert torch.equal(a, b)


def test_dis_l_loss_leaves_the_discriminator_untouched(debug_cfg):
    """Dis's gradient is the gradient of L_GAN alone, whatever weight L_llike has."""
    x, nz = batch(debug_cfg), noise(debug_cfg)
    results = []
    for gamma in (0.0, 1.0, 100.0):
        torch.manual_seed(0)
        model, step = make(debug_cfg, gamma=gamma)
        ref = copy.deepcopy(model)
        step.compute_gradients(x, nz)
        results.append(grads(model.discriminator))
        b = x.shape[0]
        mu, lv = ref.encoder(x)
        fake = decode(ref.decoder, reparameterize(mu, lv, nz[0]), nz[1], debug_cfg)
        logits, _ = ref.discriminator(torch.cat([x, fake.detach()]))
        gan_only = torch.autograd.grad(gan_bce(*logits.split(b)),
                                       list(ref.discriminator.parameters()))
        assert_grads_close(results[-1], gan_only, "discriminator")
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_all_updates_use_the_same_parameter_values(debug_cfg):
    """A step = gradients at theta_t for all three nets, then each optimizer steps once."""
    model, step = make(debug_cfg, gamma=0.3)
    x, nz = batch(debug_cfg), noise(debug_cfg)
    ref = copy.deepcopy(model)
    ref_step = TrainStep.for_model(ref, debug_cfg)
    ref_step.compute_gradients(x, nz)
    for opt in ref_step.optimizers.values():
        opt.step()
    step(x, nz)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kl_weight", [1.0, 0.25])
def test_vae_mode_is_the_pixel_baseline(debug_cfg, kl_weight):
    model, step = make(debug_cfg, mode="vae", kl_weight=kl_weight)
    x, (eps, z_p) = batch(debug_cfg), noise(debug_cfg)
    ref = copy.deepcopy(model)
    step.compute_gradients(x, (eps, z_p))
    mu, lv = ref.encoder(x)
    obj = kl_weight * kl_prior(mu, lv) + llike_pixel(x, ref.decoder(reparameterize(mu, lv, eps)))
    for name in ("encoder", "decoder"):
        net = getattr(ref, name)
        assert_grads_close(grads(getattr(model, name)),
                           torch.autograd.grad(obj, list(net.parameters()), retain_graph=True),
                           name)
    assert all(p.grad is None for p in model.discriminator.parameters())


def test_gan_mode_has_no_encoder(debug_cfg):
    model, step = make(debug_cfg, mode="gan")
    before = copy.deepcopy(model.encoder.state_dict())
    m = step(batch(debug_cfg))
    assert m.kl_prior == 0 and m.llike_dis_l == 0 and m.gan_bce > 0
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize(("costs", "skip"), [((0.2, 0.68), "dis"), ((0.68, 1.2), "dec")])
def test_equilibrium_skips_leave_that_network_unchanged(debug_cfg, costs, skip):
    """The rule's decision pauses exactly that optimizer; Enc always updates. The costs are
    injected through the cross-rank averaging seam (the rule itself is tested in
    test_losses)."""
    debug_cfg.loss.recipe = "reference"
    model = VAEGAN(debug_cfg.model)
    step = TrainStep.for_model(model, debug_cfg, mean_across_ranks=costs_of(*costs))
    net = model.discriminator if skip == "dis" else model.decoder
    other = model.decoder if skip == "dis" else model.discriminator
    before = {n: copy.deepcopy(m.state_dict()) for n, m in (("net", net), ("other", other),
                                                             ("enc", model.encoder))}
    m = step(batch(debug_cfg))
    assert (m.skip_dis, m.skip_dec) == ((1.0, 0.0) if skip == "dis" else (0.0, 1.0))

    def changed(module, state):
        return {k for k, v in module.state_dict().items()
                if "running" not in k and "num_batches" not in k  # BN buffers move anyway
                and not torch.equal(v, state[k])}
    assert not changed(net, before["net"])
    assert changed(other, before["other"]) and changed(model.encoder, before["enc"])


def test_same_seed_same_parameters_after_three_steps(debug_cfg):
    def run():
        torch.manual_seed(1)
        model, step = make(copy.deepcopy(debug_cfg))
        for _ in range(3):
            step(batch(debug_cfg))
        return model

    for a, b in zip(run().state_dict().values(), run().state_dict().values(), strict=True):
        assert torch.equal(a, b)


def plain_terms(model, cfg, x, eps, z_p):
    """The loss terms of one step, from one plain forward of each network (train mode)."""
    L, b = cfg.loss, x.shape[0]
    enc, dec, dis = model.encoder, model.decoder, model.discriminator
    zero = torch.zeros(())
    if L.mode == "gan":
        logits, _ = dis(torch.cat([x, dec(z_p)]))
        lr, lp = logits.split(b)
        return {"kl_prior": zero, "llike_dis_l": zero, "llike_pixel": zero, "gan_bce": gan_bce(lr, None, lp)}
    mu, log_var = enc(x)
    z = reparameterize(mu, log_var, eps)
    if L.mode == "vae":
        return {"kl_prior": kl_prior(mu, log_var), "llike_dis_l": zero,
                "llike_pixel": llike_pixel(x, dec(z)), "gan_bce": zero}
    logits, feats = dis(torch.cat([x, decode(dec, z, z_p, cfg)]))
    lr, lt, lp = logits.split(b)
    fr, ft, _ = feats.split(b)
    return {"kl_prior": kl_prior(mu, log_var), "llike_dis_l": llike_dis_l(fr, ft), "llike_pixel": zero,
            "gan_bce": gan_bce(lr, lt if L.recipe == "paper" else None, lp)}


@pytest.mark.parametrize(("mode", "recipe"), [("vaegan", "paper"), ("vaegan", "reference"),
                                              ("vae", "paper"), ("gan", "paper")])
def test_five_full_steps_without_inplace_errors(debug_cfg, mode, recipe):
    model, step = make(debug_cfg, mode=mode, recipe=recipe)
    before = copy.deepcopy(model.state_dict())
    for _ in range(4):
        step(batch(debug_cfg))
    # The 5th step's breakdown is its batch's losses at the weights before its update.
    x, (eps, z_p) = batch(debug_cfg), noise(debug_cfg)
    with torch.no_grad():
        expected = plain_terms(copy.deepcopy(model), debug_cfg, x, eps, z_p)
    m = step(x, (eps, z_p))
    assert step.step_count == 5
    for name, value in expected.items():
        assert getattr(m, name) == pytest.approx(float(value), rel=1e-4, abs=1e-6), name
    assert m.loss == pytest.approx(sum(float(v) for v in expected.values()), rel=1e-4)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_non_finite_loss_names_the_term_and_step(debug_cfg):
    model, step = make(debug_cfg)
    step(batch(debug_cfg))
    before = copy.deepcopy(model.state_dict())
    x = batch(debug_cfg)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"loss term kl_prior is nan at step 1"):
        step(x)
    for k, v in model.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, before[k]), "no weight may change on a non-finite loss"


def test_state_dict_round_trip_gives_the_identical_next_step(debug_cfg):
    model, step = make(debug_cfg)
    for _ in range(2):
        step(batch(debug_cfg))
    clone = copy.deepcopy(model)
    clone_step = TrainStep.for_model(clone, debug_cfg)
    clone_step.load_state_dict(copy.deepcopy(step.state_dict()))
    x = batch(debug_cfg)
    step(x)
    clone_step(x)
    for a, b in zip(model.state_dict().values(), clone.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_of_another_device_type_loads_without_its_generator_state(debug_cfg):
    """A CUDA generator's state is 16 bytes (seed and offset), a CPU one's 5,056: a run that
    resumes on the other device type keeps its own generator and loads the rest."""
    model, step = make(debug_cfg)
    step(batch(debug_cfg))
    state = copy.deepcopy(step.state_dict())
    state["generator"] = torch.zeros(16, dtype=torch.uint8)  # the size of a CUDA generator's
    _, fresh = make(debug_cfg)
    own = fresh.generator.get_state()
    fresh.load_state_dict(state)
    assert fresh.step_count == step.step_count
    assert torch.equal(fresh.generator.get_state(), own)
    assert fresh.opt_dec.state_dict()["state"].keys() == step.opt_dec.state_dict()["state"].keys()


def test_the_lr_anneal_follows_the_steps_or_a_progress_the_caller_gives(debug_cfg):
    debug_cfg.optim.lr_final = debug_cfg.optim.lr / 100
    debug_cfg.train.steps = 4
    _, step = make(debug_cfg)
    step.step_count = 2  # half of train.steps: the geometric mean of lr and lr_final
    step(batch(debug_cfg))
    assert step.opt_dec.param_groups[0]["lr"] == pytest.approx(debug_cfg.optim.lr / 10)
    step.progress = 1.0  # e.g. train.minutes spent, far from train.steps
    step(batch(debug_cfg))
    assert all(g["lr"] == pytest.approx(debug_cfg.optim.lr_final)
               for opt in step.optimizers.values() for g in opt.param_groups)
