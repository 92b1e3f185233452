"""VFM-VAE (tokenizers/vfmvae.py): parity with the official code, loading rules, latent
shapes and the training terms.

``fixtures/vfmvae.safetensors`` holds a tiny official ``networks.generator.Generator``
(tianciB/VFM-VAE, random non-zero weights, fp32, eval, CPU) with its frozen tiny SigLIP, an
input image and the official outputs: posterior mean and log-variance (the official
encoder samples even in eval, so the moments are compared), and the decoding of a given z
with its smaller RGB outputs (see fixtures/README.md).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from latentforge.tokenizers import losses
from latentforge.tokenizers.vfmvae import (
    CONFIGS,
    VFMVAE,
    VFMVAEConfig,
    equivariant,
    latent_shape,
    load_published,
    stage_of,
)

FIXTURE = Path(__file__).parent / "fixtures" / "vfmvae.safetensors"


def fixture_vfm():
    """The fixture's tiny SigLIP as our frozen HF VFM."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from latentforge.tokenizers.vfm import HFVFM

    with safe_open(str(FIXTURE), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(FIXTURE))
    model = SiglipVisionModel(SiglipVisionConfig(**json.loads(meta["vfm_config"])))
    vfm_sd = {k[4:]: v.float() for k, v in tensors.items() if k.startswith("vfm.")}
    model.load_state_dict(vfm_sd, strict=True)
    mean, std = json.loads(meta["vfm_mean"]), json.loads(meta["vfm_std"])
    return HFVFM(model, "hf:tiny-siglip", None, True, None, mean, std), tensors, meta


def tiny_model(vfm=None, **kw) -> VFMVAE:
    cfg = VFMVAEConfig(config="tiny", perceptual="none", **kw)
    return VFMVAE(CONFIGS["tiny"], cfg, vfm)


def test_official_weights_load_strictly_and_outputs_match():
    vfm, t, meta = fixture_vfm()
    assert json.loads(meta["kwargs"])["legacy"] is True
    model = tiny_model(vfm).eval()
    weights = {k[7:]: v.float() for k, v in t.items() if k.startswith("weight.")}
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        mean, logvar = model.moments(t["input.x01"].float() * 2 - 1)
        decoded, smaller = model.decode_all(t["input.z"])
    assert len(smaller) == 2 and smaller[0].shape[-1] == 16  # largest first
    pairs = [(mean, "mean"), (logvar, "logvar"), (decoded, "decoded")]
    pairs += [(s, f"multiscale{i}") for i, s in enumerate(smaller)]
    for ours, key in pairs:
        ref = t[f"output.{key}"]
        assert ours.shape == ref.shape, key
        assert (ours - ref).abs().max().item() <= 1e-5, key


def released_file(tmp_path, model: VFMVAE, extra: dict | None = None) -> str:
    """``model``'s weights as a released training file: {G, D, G_ema}, with the frozen
    VFM's entries in the generator."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["vfm_encoder.encoder.vision_model.post_layernorm.weight"] = torch.ones(16)
    sd.update(extra or {})
    path = tmp_path / "vfm_vae.pth"
    torch.save({"G": sd, "D": {"x": torch.zeros(1)}, "G_ema": sd}, path)
    return str(path)


def test_released_checkpoint_loads_dropping_the_frozen_vfm(tmp_path):
    src = tiny_model()
    path = released_file(tmp_path, src)
    for vf in (None, 0.0):  # with and without the VF projection (inference builds)
        model = tiny_model(vf_weight=vf)
        load_published(model, path)
        for k, v in model.state_dict().items():
            assert torch.equal(v, src.state_dict()[k]), k
    assert tiny_model(vf_weight=0.0).ldm_adapter.linear_proj is None


def test_missing_weights_name_the_hub_repo(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiancibi/VFM-VAE"):
        load_published(tiny_model(), str(tmp_path / "absent.pth"))


def test_other_size_names_the_first_mismatched_keys(tmp_path):
    src = tiny_model()
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("synthesis.blocks.2.")}
    sd["synthesis.blocks.0.conv0.dwconv.weight"] = torch.zeros(3, 1, 5, 5)
    file = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(file))
    with pytest.raises(ValueError, match=r"missing \['synthesis.blocks.2.*other shapes"):
        load_published(tiny_model(), str(file))


def test_vavae_checkpoint_is_refused_with_its_keys(tmp_path):
    file = tmp_path / "vavae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, str(file))
    with pytest.raises(ValueError, match=r"not a VFM-VAE tiny.*unexpected \['encoder.conv_in"):
        load_published(tiny_model(), str(file))


def test_latent_shape_without_building():
    assert latent_shape(VFMVAEConfig(config="f16d32-siglip2"), 256) == (32, 16, 16)
    assert latent_shape(VFMVAEConfig(config="shapes"), 32) == (4, 8, 8)
    with pytest.raises(ValueError, match="not divisible"):
        latent_shape(VFMVAEConfig(config="f16d32-siglip2"), 200)
    with pytest.raises(KeyError, match="unknown tokenizer config"):
        latent_shape(VFMVAEConfig(config="nope"), 256)


def test_published_config_sizes():
    """The released decoder's widths (StyleGAN-T's channel rule at 256 px) and the
    adapter's concatenated width (3 levels x 64 x 2 x 2)."""
    arch = CONFIGS["f16d32-siglip2"]
    assert [arch.block_channels(i) for i in range(6)] == [512, 512, 512, 512, 256, 128]
    assert arch.grid_ratio() == 2
    with torch.device("meta"):  # shapes only
        sd = VFMVAE(arch, VFMVAEConfig(config="f16d32-siglip2", perceptual="none")).state_dict()
    # the official Generator built from the released stage-0 config has these 783 entries
    # besides its VFM's (checked once against tianciB/VFM-VAE b3a752a)
    assert len(sd) == 783 and sum(v.numel() for v in sd.values()) == 140_291_064
    assert sd["ldm_adapter.final_quant.blocks.0.attn.qkv.weight"].shape == (2304, 768)
    assert sd["ldm_adapter.linear_proj.weight"].shape == (1024, 32, 1, 1)


def test_round_trip_any_size_and_decode_needs_no_vfm():
    vfm, _, _ = fixture_vfm()
    model = tiny_model(vfm).eval()
    x = torch.rand(2, 3, 48, 32) * 2 - 1  # non-square; the VFM interpolates positions
    z = model.encode(x)
    assert z.shape == (2, 4, 12, 8)
    assert model.decode(z).shape == (2, 3, 48, 32)
    fresh = tiny_model()  # no VFM loaded: decoding alone never needs it
    assert fresh.decode(z).shape == (2, 3, 48, 32) and fresh._frozen["vfm"] is None


def test_stages_choose_terms_and_trained_parameters():
    assert stage_of(VFMVAEConfig(stage="weak-alignment")).vf == 1.0
    assert stage_of(VFMVAEConfig(stage="weak-alignment", vf_weight=2.0)).vf == 2.0
    model = tiny_model(stage="ssim-finetune")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("ldm_adapter.post_quant.") for n in trained)
    assert not any(n.startswith("ldm_adapter.final_quant.") for n in trained)
    assert model.ldm_adapter.linear_proj is None  # no VF term in stage 2
    model = tiny_model(stage="gan-finetune", disc_weight=0.1)  # of 3 blocks: 1 and 2
    trained = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"1", "2"}
    assert any(p.requires_grad for p in model.synthesis.z_convs["2"].parameters())


def term_values(stage: str, **kw) -> dict:
    vfm, _, _ = fixture_vfm()
    torch.manual_seed(0)
    model = tiny_model(vfm, stage=stage, equivariance=False, **kw).train()
    out = model.loss(torch.rand(2, 3, 32, 32) * 2 - 1, nimg=0)
    out["loss"].backward()
    return out


def test_alignment_stage_terms():
    out = term_values("strong-alignment")
    assert {"l1", "multiscale_l1", "kl", "vf", "vf_weight_eff"} <= set(out)
    assert "ssim" not in out and out["vf_weight_eff"] > 0


def test_ssim_stage_terms_and_multiscale_window():
    out = term_values("ssim-finetune")
    assert {"l1", "ssim"} <= set(out) and "vf" not in out and "multiscale_l1" not in out
    assert "multiscale_l1" not in term_values("strong-alignment", multiscale_end_images=0.0)
    assert not stage_of(VFMVAEConfig(stage="weak-alignment")).multiscale


def test_gan_stage_needs_a_gan_term():
    from latentforge.tokenizers.vfmvae import check_config

    with pytest.raises(ValueError, match="tokenizer.disc_weight"):
        check_config(VFMVAEConfig(stage="gan-finetune"))
    check_config(VFMVAEConfig(stage="gan-finetune", disc_weight=0.1))


def test_ssim_loss_is_zero_for_equal_images_and_grows_with_noise():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert losses.ssim_loss(x, x).abs().item() < 1e-6
    noisy = losses.ssim_loss(x, x + 0.3 * torch.randn_like(x))
    assert 0.05 < noisy.item() <= 2.0


def test_multiscale_l1_compares_with_the_resized_target():
    x = torch.rand(1, 3, 16, 16)
    small = torch.nn.functional.interpolate(x, size=8, mode="bilinear", antialias=True)
    assert losses.multiscale_l1(x, [small, small[..., :4, :4]], [1.0, 0.0]).item() < 1e-6
    assert losses.multiscale_l1(x, [small + 0.5], [0.1]).item() == pytest.approx(0.05, abs=1e-6)


def test_equivariance_transform_scales_then_turns():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    turned = equivariant(x, 1.0, 1, antialias=False)
    assert torch.equal(turned, torch.rot90(x, 1, dims=[-1, -2]))
    assert equivariant(x, 0.5, 2, antialias=True).shape == (1, 1, 2, 2)


def test_equivariance_applies_the_same_transform_to_z_and_target(monkeypatch):
    """With z scaled by 1/2 and turned once, the reconstruction and its target are both
    half-size and the L1 is finite; the input-scale branch shrinks the VFM input."""
    vfm, _, _ = fixture_vfm()
    model = tiny_model(vfm, equivariance=True).train()
    seen = []
    original = model.decode_all
    monkeypatch.setattr(model, "decode_all", lambda z: seen.append(z.shape) or original(z))
    for draw in ((0.5, 1, False), (0.5, 0, True)):
        monkeypatch.setattr(model, "draw_equivariance", lambda d=draw: d)
        out = model.loss(torch.rand(2, 3, 32, 32) * 2 - 1, nimg=0)
        assert torch.isfinite(out["loss"])
    assert seen == [(2, 4, 4, 4), (2, 4, 4, 4)]


ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = [
    ROOT / "experiments/shapes/vfmvae.yaml",
    ROOT / "experiments/imagenet256/vfmvae_f16d32_siglip2.yaml",
]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_files_load_and_dry_run(path, capsys, tmp_path):
    from latentforge.cli import main
    from latentforge.config import load_experiment

    cfg = load_experiment(path)
    assert cfg.tokenizer.name == "vfmvae" and isinstance(cfg.tokenizer, VFMVAEConfig)
    verb = "run" if "shapes" in path.parts else "train-tokenizer"
    assert main([verb, str(path), f"run_dir={tmp_path}", "--dry-run"]) == 0
    assert "tokenizer" in capsys.readouterr().out


def test_imagenet_file_follows_the_released_stage_zero():
    from latentforge.config import load_experiment

    cfg = load_experiment(EXPERIMENTS[1])
    stage = stage_of(cfg.tokenizer)
    assert (stage.kl, stage.vf, stage.l1, stage.perceptual, stage.ssim) == (
        1e-6,
        5.0,
        1.0,
        10.0,
        0.0,
    )
    assert cfg.train.tokenizer_betas == [0.0, 0.99] and cfg.train.tokenizer_batch_size == 512
    assert latent_shape(cfg.tokenizer, cfg.data.resolution) == (32, 16, 16)


def test_platform_fit_with_gan_then_inference_build_loads_the_weights(tmp_path):
    """The shapes experiment through the plain training loop (GAN phase from 16 images),
    then the inference build (no VF projection, no perceptual network) loads the EMA
    weights and encodes / decodes."""
    from latentforge.config import load_experiment
    from latentforge.models import load_tokenizer
    from latentforge.shapes import render_shapes
    from latentforge.training.loop import fit, tokenizer_job
    from latentforge.training.runtime import LocalRuntime

    cfg = load_experiment(
        EXPERIMENTS[0],
        [
            "train.tokenizer_images=32",
            "train.tokenizer_batch_size=8",
            "train.checkpoint_every_images=32",
            "tokenizer.perceptual=none",
            "tokenizer.disc_weight=0.1",
            "tokenizer.disc_start=16",
            "tokenizer.disc_channels=8",
        ],
    )
    images, labels = render_shapes(range(32), 32)
    runtime = LocalRuntime({"image": images, "label": labels}, tmp_path)
    out = fit(cfg, tokenizer_job(cfg), runtime, log=lambda *_: None)
    assert out["nimg"] == 32
    last = out["curve"][-1]
    assert all(np.isfinite(last[k]) for k in ("l1", "kl", "vf", "g_loss"))
    ema = next(tmp_path.rglob("ema.safetensors"))
    model = load_tokenizer(cfg, ema)
    assert model.ldm_adapter.linear_proj is None and model.perceptual is None
    x = torch.as_tensor(images[:2]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert model.decode(model.encode(x)).shape == (2, 3, 32, 32)


def test_a_copy_shares_the_frozen_vfm_even_when_loaded_later():
    import copy

    model = tiny_model()
    ema = copy.deepcopy(model)
    vfm, _, _ = fixture_vfm()
    model._frozen["vfm"] = vfm
    assert ema.vfm is vfm
    assert ema.synthesis.blocks["0"].torgb.weight is not model.synthesis.blocks["0"].torgb.weight


def test_perceptual_term_enters_with_the_stage_weight():
    """LPIPS (random VGG backbone here: no download) adds stage weight x its value."""
    vfm, _, _ = fixture_vfm()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    cfg = VFMVAEConfig(config="tiny", perceptual="lpips", vf_weight=0.0, equivariance=False)
    weights = tiny_model(vf_weight=0.0).state_dict()
    totals, parts = [], []
    for perceptual in (None, losses.LPIPSLoss("vgg", pretrained_backbone=False)):
        model = VFMVAE(CONFIGS["tiny"], cfg, vfm, perceptual).eval()
        model.load_state_dict(weights)
        torch.manual_seed(1)  # the same posterior sample
        out = model.loss(x, nimg=0)
        totals.append(out["loss"].item())
        parts.append(out.get("perceptual_lpips"))
    assert parts[0] is None and parts[1].item() > 0
    assert totals[1] - totals[0] == pytest.approx(10.0 * parts[1].item(), rel=1e-4)


def test_projected_discriminator_on_frozen_vit_features(tmp_path):
    """tokenizer.disc_vfm: StyleGAN-T's projected discriminator (heads on the frozen ViT's
    features behind DiffAugment) instead of the PatchGAN; the ViT gets no gradients and is
    not in the discriminator's state_dict, the images do; a missing ViT is named before
    training starts."""
    from latentforge.config import ConfigError, load_experiment
    from latentforge.models import build_tokenizer, check_training_files
    from latentforge.tokenizers import losses

    over = ["tokenizer.disc_weight=0.1", "tokenizer.disc_vfm=local:shapes-vit"]
    cfg = load_experiment(EXPERIMENTS[0], over)
    model = build_tokenizer(cfg)
    disc = model.make_discriminator()
    assert isinstance(disc, losses.GANCritic)
    assert isinstance(disc.discriminator, losses.VFMDiscriminator)
    assert not any(k.startswith("_backbone") or "vfm" in k for k in disc.state_dict())
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    out = model.discriminator_loss(disc, x, x.detach() * 0.5)
    out["loss"].backward()
    assert all(p.grad is not None for p in disc.parameters() if p.requires_grad)
    g = model.loss(x.detach(), 10**6, discriminator=disc)  # the decoder's GAN term through it
    assert torch.isfinite(g["g_loss"]) and g["loss"].requires_grad
    patch = build_tokenizer(load_experiment(EXPERIMENTS[0], over[:1])).make_discriminator()
    assert isinstance(patch, losses.NLayerDiscriminator)
    missing = load_experiment(EXPERIMENTS[0], [over[0], "tokenizer.disc_vfm=local:nope"])
    with pytest.raises(ConfigError, match="tokenizer.disc_vfm"):
        check_training_files(missing)


# ------------------------------------------------ stage 3: multi-scale PatchGAN (pix2pixHD)


def test_local_batch_norm_normalises_each_group_of_samples():
    from latentforge.tokenizers.pix2pixhd import LocalBatchNorm2d

    norm = LocalBatchNorm2d(3, virtual_batch=4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        norm.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x = torch.randn(8, 3, 5, 5) * 3 + 2
    by_group = [
        F.batch_norm(g, None, None, norm.weight, norm.bias, training=True, eps=1e-5)
        for g in x.split(4)
    ]
    assert torch.allclose(norm(x), torch.cat(by_group), atol=1e-5)
    assert torch.allclose(norm(x[:4]), by_group[0], atol=1e-5)  # the others do not matter
    with pytest.raises(ValueError, match="equal groups"):
        norm(x[:7])


def test_multiscale_patchgan_losses_and_feature_matching():
    from latentforge.tokenizers import pix2pixhd as p2p

    disc = p2p.MultiscalePatchGAN(scales=3, channels=8, layers=3)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    out = disc(x)
    assert len(out) == 3 and all(len(s) == 5 for s in out)  # 3 + 2 layers per scale
    assert [s[0].shape[-1] for s in out] == [17, 9, 5]  # the image, pooled once, twice
    assert [s[-1].shape[1] for s in out] == [1, 1, 1]
    assert p2p.feature_matching_loss(out, out).item() == 0.0
    y = x.flip(-1)
    fake = disc(y)
    pairs = [(r, f) for rs, fs in zip(out, fake, strict=True) for r, f in zip(rs, fs, strict=True)]
    layers = [pair for i, pair in enumerate(pairs) if i % 5 != 4]  # not the logits
    expected = sum(4.0 / 4 / 3 * F.l1_loss(f, r) for r, f in layers)
    assert p2p.feature_matching_loss(out, fake).item() == pytest.approx(expected.item())
    ones = [[torch.ones(2, 1, 3, 3)]] * 3
    zeros = [[torch.zeros(2, 1, 3, 3)]] * 3
    assert p2p.lsgan_d_loss(ones, zeros).item() == 0.0  # the discriminator's optimum
    assert p2p.lsgan_d_loss(zeros, ones).item() == 2.0
    assert p2p.lsgan_g_loss(ones).item() == 0.0 and p2p.lsgan_g_loss(zeros).item() == 1.0


def test_stage_three_trains_against_both_discriminators(tmp_path):
    """gan-finetune with disc_vfm and disc_scales: the projected critic (hinge) and the
    multi-scale PatchGAN (least squares + feature matching x10) in one ModuleDict, both
    stepped; the decoder's loss is their weighted sum; the discriminators are saved."""
    from latentforge.config import load_experiment
    from latentforge.shapes import render_shapes
    from latentforge.training.loop import fit, tokenizer_job
    from latentforge.training.runtime import LocalRuntime

    over = [
        "tokenizer.stage=gan-finetune",
        "tokenizer.disc_weight=1.0",
        "tokenizer.disc_vfm=local:shapes-vit",
        "tokenizer.disc_scales=2",
        "tokenizer.disc_channels=8",
        "tokenizer.perceptual=none",
        "train.tokenizer_images=16",
        "train.tokenizer_batch_size=8",
        "train.checkpoint_every_images=16",
    ]
    cfg = load_experiment(EXPERIMENTS[0], over)
    job = tokenizer_job(cfg)
    assert set(job.discriminator) == {"projected", "multiscale"}
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    parts = job.model.loss(x, 0, job.discriminator)
    expected = parts["g_loss"] + parts["g_patchgan"] + 10.0 * parts["feature_matching"]
    assert parts["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    images, labels = render_shapes(range(16), 32)
    runtime = LocalRuntime({"image": images, "label": labels}, tmp_path)
    out = fit(cfg, job, runtime, log=lambda *_: None)
    last = out["curve"][-1]
    for key in ("g_loss", "g_patchgan", "feature_matching", "d_loss", "d_patchgan"):
        assert np.isfinite(last[key]), key
    saved = next(tmp_path.rglob("discriminator.safetensors"))
    keys = load_file(saved)
    assert any(k.startswith("multiscale.scales.1.") for k in keys)
    assert any(k.startswith("projected.") for k in keys)
