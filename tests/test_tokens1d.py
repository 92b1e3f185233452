"""MAETok and SoftVQ-VAE (Hhhhhhao/continuous_tokenizer): parity with the official code
through ``tests/fixtures/{softvq,maetok}.safetensors`` (tiny models, random non-zero weights,
the official ``encode`` / ``decode`` in fp32), strict and failing loads of published files,
the soft quantiser, MAETok's mask ratio and HOG target, and the training objective."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from latentforge.tokenizers import losses
from latentforge.tokenizers.token1d import (
    CONFIGS,
    MAETokConfig,
    Token1DConfig,
    build_token1d,
    latent_shape,
    load_published,
)
from latentforge.tokenizers.token1d_model import Token1D, inference_state, mask_ratio
from latentforge.tokenizers.token1d_nets import SoftVQuantizer, TokenArch

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parent.parent
OFF = dict(perceptual="none", disc_weight=0.0, repa_weight=0.0, mask_min=0.0, mask_max=0.0)


def fixture(kind: str):
    """Our model with the architecture of a fixture (weights not loaded), its official
    weights and tensors."""
    path = FIXTURES / f"{kind}.safetensors"
    with safe_open(str(path), "pt") as f:
        kw = json.loads(f.metadata()["kwargs"])
    t = load_file(str(path))
    weights = {k[7:]: v.float() for k, v in t.items() if k.startswith("weight.")}
    arch = TokenArch(
        kind=kind,
        width=32,  # the fixture's tiny stand-ins (metadata "tiny_vits")
        depth=2,
        heads=2,
        dec_width=48,
        dec_depth=2,
        dec_heads=3,
        tokens=kw["num_latent_tokens"],
        channels=kw["codebook_embed_dim"],
        patch=kw["enc_patch_size"],
        image_size=kw["image_size"],
        rope=kw["use_rope"] and kw["rope_mixed"],
        rope_theta=kw["rope_theta"],
        movq="movq" in kw["decoder_model"],
        dec_cls_token=kw["dec_cls_token"],
        codebooks=kw["num_codebooks"] if kind == "softvq" else 0,
        codebook_size=kw["codebook_size"],
        tau=kw["tau"],
        mask_token=kw["enc_token_drop"] > 0,
    )
    cfg = (Token1DConfig if kind == "softvq" else MAETokConfig)(config="tiny", **OFF)
    return Token1D(arch, cfg, kw["image_size"]).eval(), weights, t


@pytest.mark.parametrize("kind", ["softvq", "maetok"])
def test_official_weights_load_strictly_and_outputs_match(kind):
    model, weights, t = fixture(kind)
    model.load_state_dict(inference_state(weights), strict=True)
    with torch.no_grad():
        z = model.encode(t["input.images"])  # (B, D, L)
        decoded = model.decode(t["input.latent"].transpose(1, 2))
        again = model.decode(t["output.latent"].transpose(1, 2))  # the official encoding
    assert z.shape == (2, 4, 8)
    assert (z.transpose(1, 2) - t["output.latent"]).abs().max().item() <= 1e-5
    assert (decoded - t["output.decoded"]).abs().max().item() <= 1e-5
    assert (again - t["output.decoded_latent"]).abs().max().item() <= 1e-5


def test_masked_encoding_and_entropy_loss_match_official():
    """MAETok's encoder in training mode with a given mask (the mask token replaces those
    patch embeddings before the position embedding); SoftVQ's entropy loss x 0.01."""
    model, weights, t = fixture("maetok")
    model.load_state_dict(inference_state(weights), strict=True)
    with torch.no_grad():
        z = model.tokens(t["input.images"], t["input.mask"].bool())[0]
    assert (z - t["output.latent_masked"]).abs().max().item() <= 1e-5
    assert (z - t["output.latent"]).abs().max().item() > 1e-3  # the mask matters
    model, weights, t = fixture("softvq")
    model.load_state_dict(inference_state(weights), strict=True)
    with torch.no_grad():
        logits = model.tokens(t["input.images"])[1]
    ours = 0.01 * losses.codebook_entropy_loss(logits)
    assert (ours - t["output.entropy_loss"][0]).abs().item() <= 1e-5


def test_hog_target_matches_official():
    """MAETok's ``HOGGenerator`` on a 256 px image: 16x16 tokens of 108 values."""
    t = load_file(str(FIXTURES / "maetok.safetensors"))
    ours = losses.hog_target(t["input.hog_images"], patch=16, cell=8)
    assert ours.shape == t["output.hog"].shape == (1, 256, 108)
    assert (ours - t["output.hog"]).abs().max().item() <= 1e-5


def published_dir(tmp_path, kind="softvq", **config):
    """A published-layout folder: model.safetensors with the training-only entries the
    official files carry, and config.json (the dataclass as PyTorchModelHubMixin saves it)."""
    model, weights, t = fixture(kind)
    extra = {
        "repa_model.blocks.0.attn.qkv.weight": torch.ones(3, 1),
        "projection.0.weight": torch.ones(2, 4),
        "decoder_hog.mask_token": torch.ones(1, 1, 3),
        "to_pixel_dino.weight": torch.ones(2, 2),
    }
    folder = tmp_path / kind
    folder.mkdir()
    save_file({**weights, **extra}, folder / "model.safetensors")
    with safe_open(str(FIXTURES / f"{kind}.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["kwargs"])
    meta.update(vq_mean=0.25, vq_std=1.5, **config)
    (folder / "config.json").write_text(json.dumps(meta))
    return model, t, folder


def test_published_file_loads_and_mismatches_are_named(tmp_path):
    model, t, folder = published_dir(tmp_path)
    load_published(model, str(folder / "model.safetensors"))
    with torch.no_grad():
        z = model.encode(t["input.images"])
    assert (z.transpose(1, 2) - t["output.latent"]).abs().max().item() <= 1e-5
    with pytest.raises(FileNotFoundError, match="SoftVQVAE/softvq"):
        load_published(model, str(tmp_path / "absent.safetensors"))
    # a checkpoint of the other family: the first mismatched keys are named
    other, _, other_dir = published_dir(tmp_path, "maetok")
    with pytest.raises(ValueError, match=r"not a softvq.*missing \['quantize.embedding'"):
        load_published(model, str(other_dir / "model.safetensors"))
    # another latent size: D and L read from the weights
    sd = load_file(str(folder / "model.safetensors"))
    sd["encoder.latent_tokens"] = torch.zeros(1, 16, 32)
    save_file(sd, tmp_path / "l16.safetensors")
    with pytest.raises(ValueError, match="16 tokens x 4 channels, the config's 8 x 4"):
        load_published(model, str(tmp_path / "l16.safetensors"))


def test_config_json_must_describe_the_model_and_gives_the_statistics(tmp_path):
    from latentforge.models import read_latent_stats

    model, _, folder = published_dir(tmp_path, tau=0.5)
    with pytest.raises(ValueError, match=r"tau=0.5 \(expected 0.07\)"):
        load_published(model, str(folder / "model.safetensors"))
    stats = read_latent_stats(folder / "config.json", (4, 8))  # vq_mean / vq_std: a scalar
    assert stats == {"mean": [0.25] * 4, "std": [1.5] * 4}


def test_latent_shape_without_building():
    assert latent_shape(Token1DConfig(config="softvq-l-64"), 256) == (32, 64)
    assert latent_shape(Token1DConfig(config="softvq-b-32"), 256) == (32, 32)
    assert latent_shape(MAETokConfig(config="maetok-b-128"), 256) == (32, 128)
    assert latent_shape(MAETokConfig(config="maetok-b-128-512"), 512) == (32, 128)
    assert latent_shape(Token1DConfig(), 32) == (8, 16)  # shapes-softvq
    assert latent_shape(MAETokConfig(), 32) == (8, 16)  # shapes-maetok
    with pytest.raises(ValueError, match="is a maetok, not a softvq"):
        latent_shape(Token1DConfig(config="maetok-b-128"), 256)
    with pytest.raises(KeyError, match="unknown tokenizer config"):
        latent_shape(Token1DConfig(config="nope"), 256)
    with pytest.raises(ValueError, match="not divisible"):
        latent_shape(Token1DConfig(config="softvq-l-64"), 250)
    # the published sizes: B = 768 x 12, L = 1024 x 24; BL = B encoder, L decoder
    bl = CONFIGS["softvq-bl-64"]
    assert (bl.width, bl.dec_width, bl.dec_depth) == (768, 1024, 24)


def test_published_layouts_have_the_official_keys():
    """The published MAETok-B-128 layout, on the meta device (no 170 M parameters)."""
    cfg = MAETokConfig(config="maetok-b-128", **OFF)
    with torch.device("meta"):
        sd = Token1D(CONFIGS["maetok-b-128"], cfg, 256).state_dict()
    assert sd["encoder.freqs"].shape == (2, 12, 12 * 32)  # mixed RoPE, per block and head
    assert sd["encoder.latent_tokens"].shape == (1, 128, 768)
    assert sd["decoder.model.pos_embed"].shape == (1, 257, 768)  # class slot kept
    assert "decoder.model.cls_token" not in sd and "encoder.mask_token" in sd
    assert sd["decoder.model.blocks.11.adaLN_modulation.1.weight"].shape == (4 * 768, 32)
    assert sd["decoder.to_pixel.model.weight"].shape == (3 * 16 * 16, 768)
    assert "encoder.model.blocks.0.ls1.gamma" in sd and "decoder.model.norm.weight" not in sd


# ----------------------------------------------------------------------------- quantiser


def test_soft_quantiser_properties():
    torch.manual_seed(0)
    q = SoftVQuantizer(codebooks=2, size=16, dim=4, tau=0.07)
    z = torch.randn(3, 8, 4, requires_grad=True)
    z_q, logits = q(z)
    assert z_q.shape == z.shape and logits.shape == (2, 3 * 4, 16)
    assert (z_q.norm(dim=-1) <= 1 + 1e-5).all()  # convex combinations of unit codewords
    # one codebook per contiguous segment: tokens 4..7 never see codebook 0
    z2 = z.detach().clone()
    z2[:, :4] = torch.randn(3, 4, 4)
    assert torch.equal(q(z2)[0][:, 4:], z_q[:, 4:].detach())
    # at a tiny temperature the output is the nearest (by cosine) codeword of its codebook
    q.tau = 1e-4
    sharp = q(z)[0]
    codes = torch.nn.functional.normalize(q.embedding, dim=-1)
    nearest = codes[1][(torch.nn.functional.normalize(z[:, 4:], dim=-1) @ codes[1].T).argmax(-1)]
    assert torch.allclose(sharp[:, 4:], nearest, atol=1e-4)
    # the logits see the codebook detached: it learns through z_q only
    q.tau = 0.07
    q(z)[1].sum().backward()
    assert q.embedding.grad is None and z.grad is not None


def test_entropy_loss_rewards_confident_and_diverse_codes():
    k = 8
    confident = torch.eye(k) * 10.0  # each row a different code
    assert losses.codebook_entropy_loss(confident).item() == pytest.approx(
        -torch.log(torch.tensor(k * 1.0)).item(), abs=1e-3
    )
    collapsed = torch.zeros(k, k)  # uniform rows: no confidence, full average entropy
    assert losses.codebook_entropy_loss(collapsed).item() == pytest.approx(0.0, abs=1e-4)


# ----------------------------------------------------------------------------- MAETok masking


def test_mask_ratio_follows_the_official_truncated_normal():
    from scipy import stats

    torch.manual_seed(0)
    ours = torch.tensor([mask_ratio(0.4, 0.6) for _ in range(4000)])
    ref = stats.truncnorm((0.4 - 0.6) / 0.25, 0, loc=0.6, scale=0.25)  # the official generator
    assert ours.min() >= 0.4 and ours.max() <= 0.6
    assert ours.mean().item() == pytest.approx(ref.mean(), abs=0.005)
    for q in (0.1, 0.5, 0.9):
        assert torch.quantile(ours, q).item() == pytest.approx(ref.ppf(q), abs=0.01)
    cfg = MAETokConfig(config="tiny-maetok", **{**OFF, "mask_min": 0.4, "mask_max": 0.6})
    model = build_token1d(cfg, 32)
    torch.manual_seed(1)
    mask = model.sample_mask(5, "cpu")  # 16 image tokens: ceil(16 * r) in [7, 10] each
    counts = mask.sum(1).tolist()
    assert mask.shape == (5, 16) and len(set(counts)) == 1 and 7 <= counts[0] <= 10


# ----------------------------------------------------------------------------- training


def shapes_batch(n: int = 4) -> torch.Tensor:
    from latentforge.shapes import render_shapes

    images, _ = render_shapes(range(n), 32)
    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_softvq_training_step_through_loss():
    """Entropy + REPA-style alignment (each of 8 tokens repeated over 8 of the shapes
    ViT's 64 positions) + the GAN from disc_start, and the discriminator's step."""
    cfg = Token1DConfig(
        config="tiny", perceptual="vfm", repa_proj_dim=16, disc_kernel=3, disc_start=8
    )
    torch.manual_seed(0)
    model = build_token1d(cfg, 32).train()
    disc = model.make_discriminator()
    x = shapes_batch()
    before = model.loss(x, 0, discriminator=disc)
    assert {"recon", "perceptual_vfm", "entropy", "repa"} <= set(before) and "fake" not in before
    out = model.loss(x, 8, discriminator=disc)
    assert "fake" in out and out["g_weight_eff"].item() == pytest.approx(0.2)  # not adaptive
    out["loss"].backward()
    assert model.projection[0].weight.grad is not None
    assert model.quantize.embedding.grad.abs().sum() > 0
    d = model.discriminator_loss(disc, x, out["fake"])
    assert {"d_loss", "lecam", "cr"} <= set(d) and torch.isfinite(d["loss"])
    d["loss"].backward()


def test_maetok_training_step_masks_and_predicts_aux_targets():
    cfg = MAETokConfig(config="tiny-maetok", perceptual="none", disc_kernel=3, hog_cell=4)
    cfg = replace(cfg, aux_width=16, aux_heads=2)
    torch.manual_seed(0)
    model = build_token1d(cfg, 32).train()
    x = shapes_batch()
    disc = model.make_discriminator()
    out = model.loss(x, 0, discriminator=disc)
    assert {"recon", "aux_hog", "aux_dino", "g_loss"} <= set(out) and "entropy" not in out
    assert 0 < out["g_weight_eff"].item() <= 0.4 * 1e4  # adaptive, clamped, x disc_weight
    out["loss"].backward()
    assert model.encoder.mask_token.grad is not None  # the mask token was used
    mask = model.sample_mask(4, "cpu")
    assert not torch.allclose(model.encoder(x, mask), model.encoder(x))
    assert model.to_pixel_hog.weight.shape == (108, 16)  # 3 x 9 bins x (8 / 4)^2 cells
    model.eval()
    assert "aux_hog" not in model.loss(x, 0)  # no masking at evaluation


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_token1d(Token1DConfig(config="tiny", **OFF), 32).train()
    x = shapes_batch(8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    values = []
    for _ in range(25):
        out = model.loss(x, 0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        values.append(out["recon"].item())
    assert values[-1] < 0.8 * values[0]


def test_second_phase_trains_the_pixel_decoder_only_and_checkpoints_load(tmp_path):
    """MAETok's decoder fine-tuning: the encoder (and its latents) frozen, no masking and
    no auxiliary heads; a checkpoint with training heads loads into an inference model."""
    trained = build_token1d(
        MAETokConfig(
            config="tiny-maetok",
            perceptual="none",
            hog_cell=4,
            aux_width=16,
            aux_heads=2,
            disc_weight=0.0,
        ),
        32,
    )
    assert any(k.startswith("decoder_hog.") for k in trained.state_dict())
    save_file(trained.state_dict(), tmp_path / "phase1.safetensors")
    cfg = MAETokConfig(
        config="tiny-maetok",
        perceptual="none",
        disc_weight=0.0,
        freeze_encoder=True,
        weights=str(tmp_path / "phase1.safetensors"),
    )
    model = build_token1d(cfg, 32).train()
    assert not any(k.startswith("decoder_hog.") for k in model.state_dict())
    out = model.loss(shapes_batch(), 0)
    assert "aux_hog" not in out
    out["loss"].backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.decoder.to_pixel.model.weight.grad is not None
    inference = build_token1d(MAETokConfig(config="tiny-maetok", **OFF), 32)
    inference.load_trained(trained.state_dict())
    x = shapes_batch(2)
    assert torch.equal(inference.encode(x), trained.eval().encode(x))


EXPERIMENTS = sorted(
    p
    for d in ("shapes", "imagenet256")
    for p in (ROOT / "experiments" / d).glob("*.yaml")
    if p.name.startswith(("softvq", "maetok"))
)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_files_pass_the_cli_dry_run(path, tmp_path, capsys):
    from latentforge.cli import main

    assert main(["run", str(path), f"run_dir={tmp_path}", "--dry-run"]) == 0
    assert "will run" in capsys.readouterr().out


def test_tokenizer_job_trains_with_the_gan_and_loads_for_inference(tmp_path):
    """Through the platform's loop: MAETok's masked auxiliary heads and the GAN (from
    disc_start); the checkpoint holds the heads, the inference model drops them."""
    from latentforge.config import load_experiment
    from latentforge.models import load_tokenizer
    from latentforge.shapes import render_shapes
    from latentforge.training.loop import fit, tokenizer_job
    from latentforge.training.runtime import LocalRuntime

    overrides = {
        "tokenizer.config": "tiny-maetok",
        "tokenizer.perceptual": "none",
        "tokenizer.hog_cell": 4,
        "tokenizer.aux_width": 16,
        "tokenizer.aux_heads": 2,
        "tokenizer.disc_weight": 0.4,
        "tokenizer.disc_kernel": 3,
        "tokenizer.disc_start": 32,
        "train.tokenizer_images": 64,
        "train.tokenizer_batch_size": 16,
        "train.log_every_images": 32,
        "train.checkpoint_every_images": 64,
    }
    path = ROOT / "experiments" / "shapes" / "maetok.yaml"
    cfg = load_experiment(path, [f"{k}={v}" for k, v in overrides.items()])
    images, labels = render_shapes(range(32), 32)
    job = tokenizer_job(cfg)
    out = fit(cfg, job, LocalRuntime({"image": images, "label": labels}, tmp_path), log=print)
    assert [p["disc_active"] for p in out["curve"]] == [0.0, 1.0]
    assert {"aux_hog", "aux_dino", "g_loss", "cr", "lecam"} <= set(out["curve"][-1])
    saved = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    assert any(k.startswith("decoder_dino.") for k in saved)
    model = load_tokenizer(cfg, tmp_path / "checkpoint" / "model.safetensors")
    assert not hasattr(model, "decoder_dino") and model.make_discriminator() is None
    x = torch.as_tensor(images[:2]).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = model.encode(x)
    assert z.shape == (2, 4, 8) and model.decode(z).shape == x.shape
