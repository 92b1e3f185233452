"""DiT / LightningDiT family, transport and samplers."""

import pytest
import torch

from latentforge.generators.lightningdit import (
    CONFIGS,
    LightningDiT,
    LightningDiTConfig,
    build_lightningdit,
)
from latentforge.generators.samplers import balanced_labels, noise_for_seeds, sample
from latentforge.generators.transport import (
    Transport,
    TransportConfig,
    dimension_shift,
    flip_time,
    flip_velocity,
    shift_t,
)
from latentforge.registry import GENERATORS

# millions of parameters, counted with the release flags (research notes, lightningdit.md)
PUBLISHED = {
    "LightningDiT-B/1": 130.56,
    "LightningDiT-B/2": 130.56,
    "LightningDiT-L/2": 458.15,
    "LightningDiT-XL/1": 675.26,
    "LightningDiT-XL/2": 675.26,
    "LightningDiT-1p0B/1": 1029.40,
    "LightningDiT-1p6B/1": 1631.77,
}


def tiny(**kw):
    torch.manual_seed(0)
    return build_lightningdit(LightningDiTConfig(config="tiny", **kw), (4, 8, 8), 10)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_named_config_builds(name):
    shape = (32, 16, 16) if name.startswith("LightningDiT") else (4, 32, 32)
    with torch.device("meta"):
        model = LightningDiT(CONFIGS[name], shape, 1000)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    if name in PUBLISHED:
        # LightningDiT-B/2 differs from B/1 only in the patch embed / final layer
        assert n == pytest.approx(PUBLISHED[name], abs=0.5 if name.endswith("/2") else 0.005)
    if name == "DiT-XL/2":
        assert n == pytest.approx(675.13, abs=0.01)


def test_official_key_names():
    keys = set(
        build_lightningdit(
            LightningDiTConfig(config="tiny", use_qknorm=True), (4, 8, 8), 10
        ).state_dict()
    )
    for k in (
        "pos_embed",
        "x_embedder.proj.weight",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "feat_rope.freqs_cos",
        "feat_rope.freqs_sin",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.q_norm.weight",
        "blocks.0.mlp.w12.weight",
        "blocks.0.mlp.w3.bias",
        "blocks.1.adaLN_modulation.1.weight",
        "final_layer.norm_final.weight",
        "final_layer.linear.weight",
        "final_layer.adaLN_modulation.1.bias",
    ):
        assert k in keys, k
    vanilla = set(LightningDiT(CONFIGS["DiT-S/8"], (4, 32, 32), 1000).state_dict())
    assert "blocks.0.mlp.fc1.weight" in vanilla and "feat_rope.freqs_cos" not in vanilla


def test_zero_output_at_init_and_shape():
    model = tiny()
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 10])
    out = model(x, t, y)
    assert out.shape == x.shape and torch.count_nonzero(out) == 0


def test_non_square_latents_follow_grid():
    model = build_lightningdit(LightningDiTConfig(config="tiny"), (4, 8, 12), 10)
    assert model.pos_embed.shape[1] == 4 * 6 and model.feat_rope.freqs_cos.shape[0] == 24
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    assert model(torch.randn(2, 4, 8, 12), torch.rand(2), torch.tensor([1, 2])).shape == (
        2,
        4,
        8,
        12,
    )


def test_registry_lookup():
    assert GENERATORS.get("lightningdit").config_cls is LightningDiTConfig


def trained_like(model):
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.data.normal_(0, 0.05, generator=g)
    return model.eval()


def test_cfg_scale_one_equals_conditional():
    model, tr = trained_like(tiny()), Transport(TransportConfig())
    noise, y = noise_for_seeds(range(4), (4, 8, 8)), torch.tensor([1, 2, 3, 4])
    a, nfe_a = sample(model, tr, noise, y, steps=4, cfg_scale=1.0, null_class=10)
    b, nfe_b = sample(
        model, tr, noise, y, steps=4, cfg_scale=3.0, cfg_interval=(2.0, 3.0), null_class=10
    )
    assert torch.equal(a, b) and nfe_a == nfe_b == 4


def test_guidance_changes_all_channels_and_legacy_only_three():
    model, tr = trained_like(tiny()), Transport(TransportConfig())
    noise, y = noise_for_seeds(range(2), (4, 8, 8)), torch.tensor([1, 2])
    cond, _ = sample(model, tr, noise, y, steps=1, null_class=10)
    full, nfe = sample(model, tr, noise, y, steps=1, cfg_scale=4.0, null_class=10)
    legacy, _ = sample(model, tr, noise, y, steps=1, cfg_scale=4.0, cfg_channels=3, null_class=10)
    assert nfe == 2
    assert all(not torch.allclose(full[:, c], cond[:, c]) for c in range(4))
    assert all(not torch.allclose(legacy[:, c], cond[:, c]) for c in range(3))
    # channel 3 keeps the conditional prediction (up to float noise of the doubled batch)
    assert torch.allclose(legacy[:, 3], cond[:, 3], atol=1e-5)
    assert (full[:, 3] - cond[:, 3]).abs().max() > 1e-3


def test_cfg_interval_skips_unconditional_passes():
    model, tr = trained_like(tiny()), Transport(TransportConfig())
    noise, y = noise_for_seeds(range(2), (4, 8, 8)), torch.tensor([1, 2])
    _, nfe = sample(
        model, tr, noise, y, steps=10, cfg_scale=2.0, cfg_interval=(0.5, 1.0), null_class=10
    )
    assert nfe == 10 + 5  # t = 0.5, 0.6, 0.7, 0.8, 0.9 guided


def weaker(model):
    """The model with its weights perturbed: a stand-in for a smaller or earlier guide."""
    g = torch.Generator().manual_seed(2)
    for p in model.parameters():
        p.data.add_(torch.randn(p.shape, generator=g), alpha=0.03)
    return model


def test_autoguidance_by_the_model_itself_is_the_unguided_sample():
    model, tr = trained_like(tiny()), Transport(TransportConfig())
    noise, y = noise_for_seeds(range(4), (4, 8, 8)), torch.tensor([1, 2, 3, 4])
    plain, nfe_plain = sample(model, tr, noise, y, steps=4, cfg_scale=1.0, null_class=10)
    kw = dict(steps=4, cfg_scale=1.42, cfg_interval=(0.3, 1.0), null_class=10)
    self_guided, nfe = sample(model, tr, noise, y, guide=model, **kw)
    assert torch.equal(plain, self_guided)
    assert nfe_plain == 4 and nfe == 4 + 2  # t = 0.5, 0.75 guided; 0, 0.25 outside


def test_autoguidance_extrapolates_away_from_the_guide():
    """One Euler step: v = v_guide + w (v_model - v_guide), both with the real labels."""
    model, tr = trained_like(tiny()), Transport(TransportConfig())
    guide = weaker(trained_like(tiny()))
    noise, y = noise_for_seeds(range(3), (4, 8, 8)), torch.tensor([1, 2, 3])
    out, nfe = sample(model, tr, noise, y, steps=1, cfg_scale=2.0, null_class=10, guide=guide)
    t0 = torch.zeros(3)
    vm = tr.velocity(model(noise, t0, y), noise, t0)
    vg = tr.velocity(guide(noise, t0, y), noise, t0)
    expected = noise + (vg + 2.0 * (vm - vg))
    assert nfe == 2 and torch.allclose(out, expected, atol=1e-5)
    cfg_out, _ = sample(model, tr, noise, y, steps=1, cfg_scale=2.0, null_class=10)
    assert (out - cfg_out).abs().max() > 1e-3  # not classifier-free guidance
    with pytest.raises(ValueError, match="autoguidance"):
        sample(
            model, tr, noise, y, steps=1, cfg_scale=2.0, cfg_channels=3, null_class=10, guide=guide
        )


def test_autoguided_sampling_identical_whatever_the_batch_split():
    model, tr = trained_like(tiny()), Transport(TransportConfig())
    guide = weaker(trained_like(tiny()))
    seeds, y = list(range(100, 108)), balanced_labels(8, 10)
    kw = dict(steps=3, cfg_scale=1.5, null_class=10, micro_batch=4, guide=guide)
    full, _ = sample(model, tr, noise_for_seeds(seeds, (4, 8, 8)), y, **kw)
    parts = [
        sample(model, tr, noise_for_seeds(seeds[i : i + 4], (4, 8, 8)), y[i : i + 4], **kw)[0]
        for i in (0, 4)
    ]
    assert torch.equal(full, torch.cat(parts))


def test_sampling_identical_whatever_the_batch_split():
    model, tr = trained_like(tiny()), Transport(TransportConfig())
    seeds, y = list(range(100, 108)), balanced_labels(8, 10)
    kw = dict(steps=3, cfg_scale=2.0, null_class=10, micro_batch=4)
    full, _ = sample(model, tr, noise_for_seeds(seeds, (4, 8, 8)), y, **kw)
    parts = [
        sample(model, tr, noise_for_seeds(seeds[i : i + 4], (4, 8, 8)), y[i : i + 4], **kw)[0]
        for i in (0, 4)
    ]
    assert torch.equal(full, torch.cat(parts))


def test_micro_batch_padding_keeps_results():
    model, tr = trained_like(tiny()), Transport(TransportConfig())
    seeds, y = list(range(6)), balanced_labels(6, 10)
    a, _ = sample(
        model, tr, noise_for_seeds(seeds, (4, 8, 8)), y, steps=2, null_class=10, micro_batch=4
    )
    b, _ = sample(model, tr, noise_for_seeds(seeds, (4, 8, 8)), y, steps=2, null_class=10)
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


class TimeSpy(torch.nn.Module):
    """Zero velocity; records the times it is evaluated at."""

    def __init__(self):
        super().__init__()
        self.times = []

    def forward(self, x, t, y):
        self.times.append(t[0].item())
        return torch.zeros_like(x)


@pytest.mark.parametrize("shift", [0.3, 1.0, 2.0])
def test_euler_evaluates_the_shifted_time_grid(shift):
    """Euler with ``steps`` steps evaluates the model at the first ``steps`` points of the
    uniform grid u_i = i / steps mapped by LightningDiT's timestep shift
    t = s u / (1 + (s - 1) u) (t = 1 data)."""
    spy, steps = TimeSpy(), 5
    noise = torch.zeros(2, 4, 8, 8)
    sample(spy, Transport(TransportConfig()), noise, torch.tensor([0, 1]), steps=steps,
           timestep_shift=shift, null_class=10)  # fmt: skip
    u = [i / steps for i in range(steps)]
    assert spy.times == pytest.approx([shift * v / (1 + (shift - 1) * v) for v in u], abs=1e-7)


def test_balanced_labels():
    assert torch.bincount(balanced_labels(1000, 10)).tolist() == [100] * 10


class Oracle(torch.nn.Module):
    """Returns the exact velocity target for a fixed (x0, x1) pair."""

    def __init__(self, x0, x1):
        super().__init__()
        self.x0, self.x1 = x0, x1

    def forward(self, x_t, t, y):
        return self.x1 - self.x0


def test_transport_loss_zero_for_exact_target():
    tr = Transport(TransportConfig(t_sampling="uniform"))
    x1 = torch.randn(4, 4, 8, 8)
    g = torch.Generator().manual_seed(0)
    g2 = torch.Generator().manual_seed(0)
    tr.sample_t(4, "cpu", g2)
    x0 = torch.randn(x1.shape, generator=g2)
    out = tr.loss(Oracle(x0, x1), x1, torch.zeros(4, dtype=torch.long), generator=g)
    assert out["mse"].item() == pytest.approx(0.0, abs=1e-10) and out[
        "cos"
    ].item() == pytest.approx(0.0, abs=1e-6)


def test_lognorm_times_reproducible_and_in_range():
    tr = Transport(TransportConfig(t_sampling="lognorm"))
    a = tr.sample_t(1000, "cpu", torch.Generator().manual_seed(3))
    b = tr.sample_t(1000, "cpu", torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.min() > 0 and a.max() < 1 and abs(a.median() - 0.5) < 0.05


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (-0.5, 0.6)])
def test_lognorm_times_are_logit_normal(mean, std):
    """Logit-normal sampling (Esser et al. 2024, SD3 Sec. 3.1): logit(t) ~ N(mean, std^2)
    (uniform t would give logit(t) a std of pi / sqrt(3) = 1.81)."""
    cfg = TransportConfig(t_sampling="lognorm", lognorm_mean=mean, lognorm_std=std)
    t = Transport(cfg).sample_t(20_000, "cpu", torch.Generator().manual_seed(0)).double()
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(mean, abs=0.05)
    assert logit.std().item() == pytest.approx(std, abs=0.1 * std)


def test_shift_and_time_conventions():
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(shift_t(t, 0.3), torch.tensor([0.0, 0.15 / 0.65, 1.0]))
    assert torch.equal(flip_time(flip_time(t)), t)
    assert dimension_shift((32, 16, 16)) == pytest.approx(2**-0.5)  # RAE: sqrt(8192 / 4096)


@pytest.mark.parametrize("path", ["linear", "gvp", "vp"])
@pytest.mark.parametrize("prediction", ["velocity", "noise"])
def test_velocity_conversion_is_consistent(path, prediction):
    """Each prediction type, when exact, converts to the same true velocity."""
    tr = Transport(TransportConfig(path=path, prediction=prediction))
    ref = Transport(TransportConfig(path=path, prediction="velocity"))
    x0, x1, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0.2, 0.5, 0.8])
    a, s, _, _ = (c.view(-1, 1, 1, 1) for c in tr.coefficients(t))
    xt = a * x1 + s * x0
    v = tr.velocity(tr.target(x0, x1, t), xt, t)
    assert torch.allclose(v, ref.target(x0, x1, t), atol=1e-4)


def test_few_steps_lower_the_loss():
    model, tr = tiny(), Transport(TransportConfig())
    x1, y = torch.randn(16, 4, 8, 8), torch.arange(16) % 10
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = tr.loss(model, x1, y, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.8 * losses[0]


# ------------------------------------------------------------------------ REPA


def repa_model(depth: int = 1, dim: int = 16):
    cfg = LightningDiTConfig(
        config="tiny", repa_depth=depth, repa_projector_dim=32,
        transport=TransportConfig(repa_weight=0.5),
    )  # fmt: skip
    return build_lightningdit(cfg, (4, 8, 8), 10, repa_dim=dim)


def test_repa_projector_keys_and_shapes():
    model = trained_like(repa_model())
    keys = {k for k in model.state_dict() if k.startswith("projectors.")}
    assert keys == {f"projectors.0.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3])
    out, projected = model(x, t, y, return_repa=True)
    assert projected.shape == (2, 16, 16)  # 4x4 tokens of width 16
    assert torch.equal(out, model(x, t, y))  # the projector does not change the prediction
    # without repa_weight the projector is not built, so plain checkpoints load strictly
    plain = build_lightningdit(LightningDiTConfig(config="tiny"), (4, 8, 8), 10, repa_dim=16)
    assert not any(k.startswith("projectors.") for k in plain.state_dict())
    with pytest.raises(ValueError, match="repa_dim"):
        plain(x, t, y, return_repa=True)


def test_repa_loss_values_and_grid_resize():
    from latentforge.generators.transport import repa_loss

    feats = torch.randn(2, 8, 4, 4)
    tokens = feats.flatten(2).transpose(1, 2)  # row-major tokens of the same grid
    assert repa_loss(tokens, feats, (4, 4)).item() == pytest.approx(-1.0, abs=1e-6)
    assert repa_loss(-tokens, feats, (4, 4)).item() == pytest.approx(1.0, abs=1e-6)
    # features on a finer grid are area-pooled to the token grid
    fine = feats.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (2, 8, 8, 8)
    assert repa_loss(tokens, fine, (4, 4)).item() == pytest.approx(-1.0, abs=1e-6)
    # a transposed token order is not the same alignment
    swapped = feats.transpose(2, 3).flatten(2).transpose(1, 2)
    assert repa_loss(swapped, feats, (4, 4)).item() > -0.9


def test_transport_repa_term_trains_blocks_up_to_its_depth():
    model = trained_like(repa_model(depth=1)).train()
    tr = Transport(TransportConfig(repa_weight=0.5))
    x1, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    feats = torch.randn(3, 16, 8, 8)
    with pytest.raises(ValueError, match="VFM features"):
        tr.loss(model, x1, y)
    out = tr.loss(model, x1, y, generator=torch.Generator().manual_seed(0), features=feats)
    assert set(out) == {"loss", "mse", "cos", "repa"} and -1 <= out["repa"] <= 1
    expected = out["mse"] + out["cos"] + 0.5 * out["repa"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    model.zero_grad()
    projected = model(x1, torch.rand(3), y, return_repa=True)[1]
    from latentforge.generators.transport import repa_loss

    repa_loss(projected, feats, model.grid).backward()
    assert model.projectors[0][0].weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks[1].attn.qkv.weight.grad is None  # after the aligned block


class GaussianPosterior(torch.nn.Module):
    """The exact prediction for data x1 ~ N(0, std^2): E[x1 | x_t] = a std^2 x / (a^2 std^2 +
    s^2) and E[x0 | x_t] = s x / (a^2 std^2 + s^2), turned into the transport's target, plus
    a small fixed-seed error such as any trained network has."""

    def __init__(self, tr: Transport, std: float, error: float):
        super().__init__()
        self.tr, self.std, self.error = tr, std, error
        self.g = torch.Generator().manual_seed(0)

    def forward(self, x, t, y):
        a, s, da, ds = (c.double().view(-1, *[1] * (x.dim() - 1)) for c in self.tr.coefficients(t))
        x = x.double()
        var = a**2 * self.std**2 + s**2
        x1, x0 = a * self.std**2 * x / var, s * x / var
        pred = {"velocity": da * x1 + ds * x0, "noise": x0, "score": -x0 / s}[
            self.tr.cfg.prediction
        ]
        return (pred + self.error * torch.randn(x.shape, generator=self.g, dtype=x.dtype)).float()


@pytest.mark.parametrize("path", ["linear", "gvp", "vp"])
@pytest.mark.parametrize("prediction", ["velocity", "noise", "score"])
@pytest.mark.parametrize("method", ["euler", "heun", "euler_maruyama"])
def test_samplers_reach_the_data_distribution(path, prediction, method):
    # every path / prediction / sampler turns the exact model of N(0, 0.5^2) data into samples
    # of std 0.5; noise and score prediction on linear / gvp start SAMPLE_EPS after t = 0,
    # where alpha = 0 would multiply the model's error by 1e5 (std 0.7-0.93 before)
    tr = Transport(TransportConfig(path=path, prediction=prediction))
    model = GaussianPosterior(tr, std=0.5, error=1e-3)
    n = 4000
    noise = noise_for_seeds(range(n), (1, 2, 2))
    x, _ = sample(
        model,
        tr,
        noise,
        torch.zeros(n, dtype=torch.long),
        steps=100,
        method=method,
        null_class=1,
        noise_seeds=range(n),
    )
    assert x.std().item() == pytest.approx(0.5, abs=0.02), (path, prediction, method)


def test_safe_time_ranges_follow_the_path():
    lin = Transport(TransportConfig())
    assert lin.train_eps == 0 and lin.sample_range() == (0.0, 1.0)  # the demo: unchanged
    noise = Transport(TransportConfig(prediction="noise"))
    assert noise.train_eps == 1e-3 and noise.sample_range() == (1e-3, 1.0)
    vp = Transport(TransportConfig(path="vp", prediction="score"))
    assert vp.train_eps == 1e-5 and vp.sample_range() == (0.0, 1 - 1e-3)
    t = vp.sample_t(10_000, "cpu", torch.Generator().manual_seed(0))
    assert t.min() >= 1e-5 and t.max() <= 1 - 1e-5
    assert Transport(TransportConfig(path="vp", train_eps=0.01)).sample_range()[1] == 0.99
    with pytest.raises(ValueError, match="train_eps"):
        Transport(TransportConfig(train_eps=-0.1))


def test_sde_noise_is_per_sample_whatever_the_batch_split():
    model, tr = trained_like(tiny()), Transport(TransportConfig())
    seeds, y = list(range(200, 208)), balanced_labels(8, 10)
    kw = dict(steps=4, method="euler_maruyama", cfg_scale=2.0, null_class=10, micro_batch=4)
    full, _ = sample(model, tr, noise_for_seeds(seeds, (4, 8, 8)), y, noise_seeds=seeds, **kw)
    parts = [
        sample(
            model,
            tr,
            noise_for_seeds(seeds[i : i + 4], (4, 8, 8)),
            y[i : i + 4],
            noise_seeds=seeds[i : i + 4],
            **kw,
        )[0]
        for i in (0, 4)
    ]
    assert torch.equal(full, torch.cat(parts))
    ode, _ = sample(model, tr, noise_for_seeds(seeds, (4, 8, 8)), y, **{**kw, "method": "euler"})
    assert (full - ode).abs().max() > 1e-2  # the SDE did add noise
    with pytest.raises(ValueError, match="noise_seeds"):
        sample(model, tr, noise_for_seeds(seeds, (4, 8, 8)), y, **kw)


def test_rectified_flow_convention_converts():
    # a model in the t' = 1 - t convention (x = (1 - t') x1 + t' x0, predicting x0 - x1)
    x0, x1, t = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0.1, 0.5, 0.9])
    rf = lambda x, tp: x0 - x1  # noqa: E731 - the exact rectified-flow velocity
    ours = Transport(TransportConfig()).target(x0, x1, t)
    assert torch.equal(flip_velocity(rf(None, flip_time(t))), ours)


def test_adaptive_dopri5_matches_a_fine_fixed_grid():
    model, tr = trained_like(tiny()), Transport(TransportConfig())
    noise, y = noise_for_seeds(range(3), (4, 8, 8)), torch.tensor([1, 2, 3])
    kw = dict(cfg_scale=2.0, null_class=10)
    fine, _ = sample(model, tr, noise, y, steps=200, method="heun", **kw)
    adaptive, nfe = sample(model, tr, noise, y, method="dopri5", **kw)
    assert (adaptive - fine).abs().max().item() < 1e-3
    assert nfe > 0 and nfe % 2 == 0  # guided everywhere: two passes per evaluation
    with pytest.raises(ValueError, match="timestep_shift"):
        sample(model, tr, noise, y, method="dopri5", timestep_shift=0.3, **kw)


def test_grad_checkpointing_gives_the_same_gradients():
    plain = trained_like(tiny()).train()
    ckpt = build_lightningdit(
        LightningDiTConfig(config="tiny", grad_checkpointing=True), (4, 8, 8), 10
    )
    ckpt.load_state_dict(plain.state_dict())
    ckpt.train()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 10])
    for model in (plain, ckpt):
        model.y_embedder.dropout = 0.0  # no random label drop: identical forward passes
        model.zero_grad()
        model(x, t, y).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        if a.grad is None:  # frozen (pos_embed)
            assert b.grad is None, name
            continue
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_one_d_tokens_train_and_sample():
    """A 1-D token latent (C, N) = (8, 16), as from MAETok / SoftVQ-VAE: patch 1, tokens on
    a 1 x N grid; the transport, CFG and samplers work on (B, C, N) unchanged."""
    from dataclasses import replace

    cfg = LightningDiTConfig(config="tiny")
    with pytest.raises(ValueError, match="patch 1"):
        build_lightningdit(cfg, (8, 16), 10)
    model = LightningDiT(replace(CONFIGS["tiny"], patch=1), (8, 16), 10)
    assert model.grid == (1, 16) and model.pos_embed.shape == (1, 16, 64)
    trained_like(model)
    x, t, y = torch.randn(3, 8, 16), torch.rand(3), torch.tensor([0, 4, 10])
    assert model(x, t, y).shape == (3, 8, 16)
    # token order matters (position embedding / RoPE): permuting tokens changes the output
    assert not torch.allclose(model(x.flip(-1), t, y).flip(-1), model(x, t, y), atol=1e-4)
    model.train()
    out = Transport(TransportConfig()).loss(model, x, y[:3].clamp(max=9))
    out["loss"].backward()
    noise = noise_for_seeds(range(4), (8, 16))
    z, nfe = sample(model.eval(), Transport(TransportConfig()), noise, balanced_labels(4, 10),
                    steps=3, cfg_scale=2.0, null_class=10)  # fmt: skip
    assert z.shape == (4, 8, 16) and torch.isfinite(z).all() and nfe == 6


def reg_model(dim=6, **kw):
    torch.manual_seed(0)
    cfg = LightningDiTConfig(config="tiny", transport=TransportConfig(reg_weight=0.03, **kw))
    return build_lightningdit(cfg, (4, 8, 8), 10, reg_dim=dim)


def test_reg_class_token_enters_attention_and_is_predicted():
    model = trained_like(reg_model())
    assert {"cls_embedder.0.weight", "cls_head.weight"} <= set(model.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3])
    cls = torch.randn(2, 6)
    out, cls_out = model(x, t, y, cls=cls)
    assert out.shape == (2, 4, 8, 8) and cls_out.shape == (2, 6)
    # the class token is one extra token: the grid's prediction depends on it
    assert not torch.allclose(out, model(x, t, y, cls=cls + 1.0)[0])
    with pytest.raises(ValueError, match="class token"):
        model(x, t, y)
    with pytest.raises(ValueError, match="reg_dim"):
        tiny()(x, t, y, cls=cls)
    # without reg_weight, no class-token layers: plain checkpoints keep loading strictly
    plain = build_lightningdit(LightningDiTConfig(config="tiny"), (4, 8, 8), 10, reg_dim=6)
    assert not any(k.startswith("cls_") for k in plain.state_dict())


def test_reg_zero_initialised_prediction_and_rope_leaves_the_class_token():
    from latentforge.generators.lightningdit import VisionRoPE

    model = reg_model()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3])
    out, cls_out = model(x, t, y, cls=torch.randn(2, 6))
    assert out.abs().max() == 0 and cls_out.abs().max() == 0
    rope = VisionRoPE(8, 2, 2)
    q = torch.randn(1, 2, 5, 8)  # one class token, then the 2x2 grid
    rotated = rope(q)
    assert torch.equal(rotated[:, :, 0], q[:, :, 0])
    assert torch.allclose(rotated[:, :, 1:], rope(q[:, :, 1:]))


def test_reg_loss_term_and_training_lowers_it():
    model = reg_model().train()
    tr = Transport(TransportConfig(reg_weight=0.03))
    g = torch.Generator().manual_seed(0)
    x1, y = torch.randn(8, 4, 8, 8), torch.arange(8) % 10
    cls = torch.randn(8, 6)
    with pytest.raises(ValueError, match="class token"):
        tr.loss(model, x1, y)
    out = tr.loss(model, x1, y, generator=g, cls=cls)
    assert set(out) == {"loss", "mse", "cos", "reg"}
    expected = out["mse"] + out["cos"] + 0.03 * out["reg"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        o = tr.loss(model, x1, y, generator=torch.Generator().manual_seed(1), cls=cls)
        first = o["reg"].item() if first is None else first
        opt.zero_grad()
        o["loss"].backward()
        opt.step()
    assert o["reg"].item() < first


def test_reg_joint_sampling_with_guidance():
    from latentforge.generators.samplers import JointClassToken

    model = trained_like(reg_model())
    joint = JointClassToken(model, (4, 8, 8), 6)
    tr = Transport(TransportConfig())
    noise, y = noise_for_seeds(range(4), (4 * 8 * 8 + 6,)), torch.tensor([0, 1, 2, 3])
    state, nfe = sample(joint, tr, noise, y, steps=4, cfg_scale=3.0, null_class=10)
    latents, cls = joint.split(state)
    assert latents.shape == (4, 4, 8, 8) and cls.shape == (4, 6) and nfe == 8
    # bit-identical per sample whatever the split, as for plain latents
    half, _ = sample(joint, tr, noise[:2], y[:2], steps=4, cfg_scale=3.0, null_class=10)
    assert torch.allclose(half, state[:2], atol=1e-6)
    with pytest.raises(ValueError, match="REG"):
        sample(joint, tr, noise, y, steps=2, cfg_scale=3.0, null_class=10, cfg_channels=3)
