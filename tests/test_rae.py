"""RAE (bytetriper/RAE): parity with the official code through ``tests/fixtures/rae.safetensors``
(a tiny DINOv2-with-registers encoder and a tiny ``GeneralDecoder``, random non-zero weights,
outputs of the official ``RAE.encode`` / ``RAE.decode`` in fp32), strict and failing loads of
published decoders, the latent shape without building, and the training pieces."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from latentforge.tokenizers.rae import (
    CONFIGS,
    RAE,
    GeneralDecoder,
    RAEArch,
    RAEConfig,
    build_rae,
    latent_shape,
    load_published,
)
from latentforge.tokenizers.vfm import HFVFM

FIXTURE = Path(__file__).parent / "fixtures" / "rae.safetensors"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def fixture_model() -> tuple[RAE, dict, dict]:
    """Our RAE with the fixture's encoder and decoder weights (both loaded strictly)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    with safe_open(str(FIXTURE), "pt") as f:
        kw = json.loads(f.metadata()["kwargs"])
    t = load_file(str(FIXTURE))
    part = {
        p: {k[len(p) + 1 :]: v.float() for k, v in t.items() if k.startswith(p + ".")}
        for p in ("encoder", "decoder")
    }
    dino = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**kw["encoder_config"]))
    dino.load_state_dict(part["encoder"], strict=True)
    vfm = HFVFM(dino, "hf:tiny", None, True, None, *IMAGENET)
    dec, enc = kw["decoder_config"], kw["encoder_config"]
    arch = RAEArch(
        encoder="hf:tiny",
        encoder_dim=enc["hidden_size"],
        encoder_patch=enc["patch_size"],
        hidden=dec["decoder_hidden_size"],
        depth=dec["decoder_num_hidden_layers"],
        heads=dec["decoder_num_attention_heads"],
        mlp=dec["decoder_intermediate_size"],
        patch=kw["rae"]["decoder_patch_size"],
        layer_norm_eps=dec["layer_norm_eps"],
    )
    resolution = t["output.decoded"].shape[-1]
    cfg = RAEConfig(config="tiny", perceptual="none", disc_weight=0.0)
    model = RAE(arch, cfg, resolution, vfm).eval()
    return model, part["decoder"], t


def test_official_weights_load_strictly_and_outputs_match():
    model, decoder, t = fixture_model()
    model.decoder.load_state_dict(decoder, strict=True)
    images = t["input.images"] * 2 - 1  # the official code takes [0, 1]
    with torch.no_grad():
        z = model.encode(images)
        decoded = (model.decode(t["input.latent"]) + 1) / 2
    assert z.shape == t["output.latent"].shape == (2, 32, 4, 4)
    assert (z - t["output.latent"]).abs().max().item() <= 1e-5
    assert (decoded - t["output.decoded"]).abs().max().item() <= 1e-5


def test_fixed_position_embedding_matches_official_init():
    """The fixture keeps the official sin-cos ``decoder_pos_embed``; ours is built equal."""
    model, decoder, _ = fixture_model()
    ours = model.decoder.decoder_pos_embed
    assert not ours.requires_grad
    assert (ours - decoder["decoder_pos_embed"]).abs().max().item() <= 1e-6


def test_final_norm_affine_is_dropped():
    """Without the encoder's final LayerNorm affine, latents are standardised per token."""
    model, _, t = fixture_model()
    assert model.encoder.final_norm.weight is None
    z = model.encode(t["input.images"] * 2 - 1)
    assert torch.allclose(z.mean(1), torch.zeros(()), atol=1e-5)


def test_published_file_loads_and_mismatches_are_named(tmp_path):
    model, decoder, t = fixture_model()
    torch.save(decoder, tmp_path / "model.pt")  # the published layout: a bare state_dict
    load_published(model, str(tmp_path / "model.pt"))
    with torch.no_grad():
        decoded = (model.decode(t["input.latent"]) + 1) / 2
    assert (decoded - t["output.decoded"]).abs().max().item() <= 1e-5
    # missing file: the hub repo and file to fetch
    with pytest.raises(FileNotFoundError, match="nyu-visionx/RAE-collections"):
        load_published(model, str(tmp_path / "absent.pt"))
    # a decoder of another size: the first mismatched keys and the expected shapes
    wrong = dict(decoder, decoder_pred_extra=torch.ones(1))
    wrong["decoder_pred.weight"] = torch.ones(5, 48)
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"decoder_pred_extra.*decoder_pred\.weight"):
        load_published(model, str(tmp_path / "wrong.pt"))
    # another family's checkpoint (a VA-VAE): missing decoder keys are named
    save_file({"encoder.conv_in.weight": torch.ones(1)}, tmp_path / "vavae.safetensors")
    with pytest.raises(ValueError, match=r"not an RAE.*missing \['decoder_pos_embed'"):
        load_published(model, str(tmp_path / "vavae.safetensors"))


def test_latent_shape_without_building():
    assert latent_shape(RAEConfig(config="dinov2-b"), 256) == (768, 16, 16)
    assert latent_shape(RAEConfig(config="dinov2-b-512"), 512) == (768, 32, 32)
    assert latent_shape(RAEConfig(config="shapes"), 32) == (128, 8, 8)
    with pytest.raises(ValueError, match="not divisible"):
        latent_shape(RAEConfig(config="mae-b"), 250)
    with pytest.raises(KeyError, match="unknown tokenizer config"):
        latent_shape(RAEConfig(config="nope"), 256)
    # the published decoders are ViT-XL
    assert {CONFIGS[n].hidden for n in ("dinov2-b", "siglip2-b", "mae-b")} == {1152}


def test_decoder_size_and_published_keys():
    """A ViT-XL decoder on 16x16 DINOv2-B tokens has the official file's shapes."""
    with torch.device("meta"):  # shapes only: no 0.5 B parameters allocated
        dec = GeneralDecoder(CONFIGS["dinov2-b"], 16, 768)
    sd = dec.state_dict()
    assert sd["decoder_pos_embed"].shape == (1, 257, 1152)
    assert sd["decoder_pred.weight"].shape == (16 * 16 * 3, 1152)
    assert "decoder_layers.27.attention.attention.query.weight" in sd
    assert "decoder_layers.0.intermediate.dense.weight" in sd


# ----------------------------------------------------------------------------- training


def tiny_cfg(**kw) -> RAEConfig:
    base = dict(config="tiny", perceptual="none", disc_kernel=3)
    return RAEConfig(**{**base, **kw})


def test_diffaugment_keeps_shapes_and_is_differentiable():
    from latentforge.tokenizers.losses import DiffAugment

    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16, requires_grad=True)
    aug = DiffAugment(prob=1.0, cutout=0.25)
    y = aug(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # translation alone moves content without changing values; cutout zeroes a square
    shifted = DiffAugment().translate(x.detach())
    assert set(shifted.unique().tolist()) <= set(x.detach().unique().tolist()) | {0.0}
    cut = DiffAugment(cutout=0.5).cut(torch.ones(2, 3, 16, 16))
    assert ((cut == 0).float().mean(dim=(1, 2, 3)) > 0).all()
    assert DiffAugment(prob=0.0)(x) is x


def test_lecam_updates_its_averages_and_penalises_the_gap():
    from latentforge.tokenizers.losses import LeCAM

    lecam = LeCAM(decay=0.9)
    real, fake = torch.full((4,), 2.0), torch.full((4,), -1.0)
    penalty = lecam(real, fake)
    assert lecam.ema_real.item() == pytest.approx(0.2) and lecam.ema_fake.item() == pytest.approx(
        -0.1
    )
    # relu(2 - (-0.1))^2 + relu(0.2 - (-1))^2
    assert penalty.item() == pytest.approx(2.1**2 + 1.2**2, rel=1e-5)
    lecam(real, fake)
    assert lecam.ema_real.item() == pytest.approx(0.2 * 0.9 + 0.2)
    assert set(lecam.state_dict()) == {"ema_real", "ema_fake"}  # saved with the discriminator


def test_discriminator_backbone_is_frozen_and_outside_the_weights():
    from latentforge.tokenizers.losses import VFMDiscriminator
    from latentforge.tokenizers.vfm import load_vfm

    vfm = load_vfm("local:shapes-vit")
    disc = VFMDiscriminator(vfm, kernel_size=3)
    assert disc.levels == [0, 1, 2, 3, 3]  # 4 levels spread over the depth, then the output
    assert not any(k.startswith(("vfm", "_backbone")) for k in disc.state_dict())
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    logits = disc(x)
    assert logits.shape == (2, 5 * 64)
    logits.mean().backward()
    assert all(p.grad is None for p in vfm.parameters())
    assert all(p.grad is not None for p in disc.parameters() if p.requires_grad)
    assert x.grad.abs().sum() > 0  # the generator's term reaches the images through it


def test_noise_augmentation_is_per_image_uniform_and_training_only():
    model = build_rae(tiny_cfg(disc_weight=0.0, noise_tau=0.8), 32)
    assert model.encoder.model.norm.weight is None  # timm ViT: the final norm's affine dropped
    torch.manual_seed(0)
    z = torch.zeros(256, 4, 8, 8)
    std = model.noise_augment(z).flatten(1).std(1)  # one sigma per image
    assert std.max() < 0.8 * 1.1 and std.min() < 0.1 and std.mean() == pytest.approx(0.4, abs=0.05)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model.eval()
    with torch.no_grad():
        a, b = model.loss(x, 0)["recon"], model.loss(x, 0)["recon"]
    assert a == b  # no noise at inference


def test_gan_phases_start_at_their_image_counts():
    """The discriminator steps from disc_start (``fake`` returned), the generator's adaptive
    GAN term from gan_start, as RAE's disc_upd_start (epoch 6) and disc_start (epoch 8)."""
    model = build_rae(tiny_cfg(disc_start=100, gan_start=200), 32).train()
    disc = model.make_discriminator()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    before, d_only, both = (model.loss(x, n, discriminator=disc) for n in (99, 100, 200))
    assert "fake" not in before and "g_loss" not in before and not model.gan_active(99)
    assert "fake" in d_only and "g_loss" not in d_only and model.gan_active(100)
    assert "fake" in both and "g_loss" in both
    assert 0 < both["g_weight_eff"].item() <= 0.75 * 1e4  # adaptive, clamped, x disc_weight
    d = model.discriminator_loss(disc, x, both["fake"])
    assert torch.isfinite(d["loss"]) and "lecam" not in d
    with_lecam = build_rae(tiny_cfg(lecam_weight=0.1), 32)
    d = with_lecam.discriminator_loss(with_lecam.make_discriminator(), x, both["fake"])
    assert "lecam" in d and d["loss"] > d["d_loss"] - 1e-6


def test_a_few_steps_lower_the_loss():
    from latentforge.shapes import render_shapes

    torch.manual_seed(0)
    model = build_rae(tiny_cfg(disc_weight=0.0, noise_tau=0.0), 32).train()
    images, _ = render_shapes(range(8), 32)
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(15):
        loss = model.loss(x, 0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# ----------------------------------------------------------------------------- platform

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = [
    ROOT / "experiments" / "shapes" / "rae.yaml",
    ROOT / "experiments" / "imagenet256" / "rae_dinov2_b.yaml",
]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_files_pass_the_cli_dry_run(path, tmp_path, capsys):
    from latentforge.cli import main

    assert main(["run", str(path), f"run_dir={tmp_path}", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("will run") == 6


def test_published_stat_pt_gives_per_element_statistics(tmp_path):
    """RAE's ``stat.pt`` holds ``mean`` and ``var`` of shape (C, H, W); the generator's
    statistics are the mean and sqrt(var + 1e-5), per element."""
    from latentforge.models import latent_stat, read_latent_stats

    mean, var = torch.randn(8, 4, 4), torch.rand(8, 4, 4) + 0.1
    torch.save({"mean": mean, "var": var}, tmp_path / "stat.pt")
    stats = read_latent_stats(tmp_path / "stat.pt", (8, 4, 4))
    std = latent_stat(stats["std"], (8, 4, 4))
    assert std.shape == (1, 8, 4, 4)
    assert torch.allclose(std[0], (var.double() + 1e-5).sqrt().float())
    assert torch.allclose(latent_stat(stats["mean"], (8, 4, 4))[0], mean)


def test_mae_encoder_at_another_input_size(tmp_path):
    """``hf:`` ViT-MAE at RAE's 256 px for a 224 px model: positions interpolated, patch order
    kept, the class token dropped (a tiny model saved as a local directory)."""
    from transformers import ViTMAEConfig, ViTMAEModel

    from latentforge.tokenizers.vfm import load_vfm

    cfg = ViTMAEConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        image_size=16, patch_size=4,
    )  # fmt: skip
    ViTMAEModel(cfg).save_pretrained(tmp_path / "mae")
    arch = replace(CONFIGS["tiny"], encoder=f"hf:{tmp_path / 'mae'}", encoder_dim=32)
    vfm = load_vfm(arch.encoder, resize=32)
    model = RAE(arch, tiny_cfg(disc_weight=0.0), 32, vfm)
    z = model.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert z.shape == (2, 32, 8, 8)


def test_tokenizer_job_trains_with_the_gan_and_loads_for_inference(tmp_path):
    """Through the platform's loop: the discriminator (heads + LeCAM averages) steps from
    disc_start; the checkpoint's weights are the decoder's only and load for encoding."""
    from latentforge.config import load_experiment
    from latentforge.models import load_tokenizer
    from latentforge.shapes import render_shapes
    from latentforge.training.loop import fit, tokenizer_job
    from latentforge.training.runtime import LocalRuntime

    cfg = load_experiment(
        EXPERIMENTS[0],
        [
            "tokenizer.config=tiny",
            "tokenizer.perceptual=none",
            "tokenizer.disc_weight=0.75",  # the shapes file trains without the GAN
            "tokenizer.disc_kernel=3",
            "tokenizer.disc_start=32",
            "tokenizer.gan_start=32",
            "tokenizer.lecam_weight=0.1",
            "train.tokenizer_images=64",
            "train.tokenizer_batch_size=16",
            "train.log_every_images=32",
            "train.checkpoint_every_images=64",
        ],
    )
    images, labels = render_shapes(range(32), 32)
    job = tokenizer_job(cfg)
    out = fit(cfg, job, LocalRuntime({"image": images, "label": labels}, tmp_path), log=print)
    assert [p["disc_active"] for p in out["curve"]] == [0.0, 1.0]
    assert "g_loss" in out["curve"][-1] and "lecam" in out["curve"][-1]
    ck = tmp_path / "checkpoint"
    assert set(load_file(str(ck / "model.safetensors"))) == set(job.model.state_dict())
    assert all(k.startswith("decoder.") for k in job.model.state_dict())
    disc = load_file(str(ck / "discriminator.safetensors"))
    assert disc["lecam.ema_real"] != 0
    model = load_tokenizer(cfg, ck / "model.safetensors")
    assert model.perceptual is None and model.make_discriminator() is None
    x = torch.as_tensor(images[:2]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert model.decode(model.encode(x)).shape == x.shape
