"""SVG (frozen VFM features + a learned residual, LDM decoder): parity with the official
autoencoder through ``tests/fixtures/svg.safetensors``, published-checkpoint loading, the
batch-independent residual matching, the training objective and the DINOv3 VFM routes."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from latentforge.models import read_latent_stats
from latentforge.registry import TOKENIZERS
from latentforge.tokenizers import losses
from latentforge.tokenizers.ldm_blocks import AEArch
from latentforge.tokenizers.svg import (
    SVG,
    SVGArch,
    SVGConfig,
    build_svg,
    load_published,
    read_published_stats,
)
from latentforge.tokenizers.vfm import IMAGENET_MEAN, IMAGENET_STD, TimmVFM, load_vfm

FIXTURE = Path(__file__).parent / "fixtures" / "svg.safetensors"
ROOT = Path(__file__).resolve().parents[1]


def fixture():
    with safe_open(str(FIXTURE), "pt") as f:
        kw = json.loads(f.metadata()["kwargs"])
    t = {k: v.float() for k, v in load_file(str(FIXTURE)).items()}
    weights = {k[len("weight.") :]: v for k, v in t.items() if k.startswith("weight.")}
    vfm_sd = {k[len("vfm.") :]: v for k, v in t.items() if k.startswith("vfm.")}
    return kw, weights, vfm_sd, t


def fixture_model(match: str = "batch", **cfg) -> tuple[SVG, dict, dict]:
    """Our SVG built as the fixture's official model (its tiny VFM loaded), without weights."""
    from timm.models.vision_transformer import VisionTransformer

    kw, weights, vfm_sd, t = fixture()
    vit = VisionTransformer(**kw["vfm_timm_vit"])
    vit.load_state_dict(vfm_sd, strict=True)
    vfm = TimmVFM(vit, "fixture", None, True, None, IMAGENET_MEAN, IMAGENET_STD)
    dd, rv = kw["ddconfig"], kw["residual_vit"]
    decoder = AEArch(
        ch=dd["ch"],
        ch_mult=tuple(dd["ch_mult"]),
        num_res_blocks=dd["num_res_blocks"],
        attn_levels=(),
        z_channels=dd["z_channels"],
    )
    arch = SVGArch(
        vfm="fixture",
        vfm_dim=kw["embed_dim"],
        patch=rv["patch_size"],
        image_size=rv["image_size"],
        residual_dim=kw["extra_vit_config"]["output_dim"],
        vit_layers=rv["num_layers"],
        vit_heads=rv["num_heads"],
        vit_width=rv["hidden_dim"],
        vit_mlp=rv["mlp_dim"],
        vit_dropout=0.1,
        decoder=decoder,
    )
    return SVG(arch, SVGConfig(match=match, **cfg), vfm).eval(), weights, t


def test_official_weights_load_strictly_and_outputs_match():
    """``shiml20/SVG`` ``DinoDecoder`` in eval mode (batch statistics, as published):
    the VFM tokens, the latent (VFM features + matched residual) and the decoding."""
    model, weights, t = fixture_model()
    ours = {k: v for k, v in weights.items() if not k.startswith("norm_vit.")}
    model.load_state_dict(ours, strict=True)
    x = t["input.x"]
    with torch.no_grad():
        tokens = model.vfm(x).patch[-1].flatten(2).transpose(1, 2)  # (B, N, C)
        latent = model.encode(x)
        decoded = model.decode(t["output.latent"])
    assert latent.shape == t["output.latent"].shape == (3, 20, 2, 2)
    assert (tokens - t["output.vfm_tokens"]).abs().max().item() <= 1e-5
    assert (latent - t["output.latent"]).abs().max().item() <= 1e-5
    assert (decoded - t["output.decoded"]).abs().max().item() <= 1e-5


def test_published_checkpoint_loads_and_names_mismatches(tmp_path):
    """The official Lightning ``.ckpt``: ``state_dict`` with ``loss.*``, the frozen DINOv3
    (``encoder.*``) and ``norm_vit.*``, dropped by rule; strict on the rest."""
    model, weights, t = fixture_model()
    extra = {"loss.discriminator.main.0.weight": torch.ones(2), "encoder.blocks.0.w": torch.ones(1)}
    torch.save({"state_dict": {**weights, **extra}, "epoch": 3}, tmp_path / "svg.ckpt")
    load_published(model, str(tmp_path / "svg.ckpt"))
    with torch.no_grad():
        latent = model.encode(t["input.x"])
    assert (latent - t["output.latent"]).abs().max().item() <= 1e-5
    with pytest.raises(FileNotFoundError, match="howlin/SVG"):
        load_published(model, str(tmp_path / "absent.ckpt"))
    # another family: a VA-VAE checkpoint (its encoder.* dropped, quant convs unexpected)
    vavae = {"decoder.conv_in.weight": torch.ones(1), "quant_conv.weight": torch.ones(1)}
    torch.save({"state_dict": vavae}, tmp_path / "vavae.ckpt")
    with pytest.raises(ValueError, match=r"missing \['mask_token'.*unexpected \['quant_conv"):
        load_published(model, str(tmp_path / "vavae.ckpt"))
    # another size: a residual of 8 channels
    other = dict(weights, mask_token=torch.ones(1, 8, 1))
    torch.save({"state_dict": other}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"other shapes \[\('mask_token', \(1, 8, 1\)"):
        load_published(model, str(tmp_path / "other.ckpt"))


def test_running_match_is_batch_independent(tmp_path):
    """``match: batch`` (published) makes an image's latent depend on its batch; ``running``
    uses statistics kept in training (or calibrated), so it does not."""
    x = fixture()[3]["input.x"]
    batch, weights, _ = fixture_model("batch")
    batch.load_state_dict({k: v for k, v in weights.items() if k != "norm_vit.weight"}, False)
    with torch.no_grad():
        assert (batch.encode(x[:1]) - batch.encode(x)[:1]).abs().max() > 1e-3
    running, _, _ = fixture_model("running")
    torch.save({"state_dict": weights}, tmp_path / "svg.ckpt")
    load_published(running, str(tmp_path / "svg.ckpt"))  # no running statistics in it
    with pytest.raises(RuntimeError, match="calibrate_match"):
        running.encode(x)
    running.calibrate_match(x[:2])
    running.calibrate_match(x[2:])
    assert int(running.match_count) == 2
    with torch.no_grad():
        one, full = running.encode(x[:1]), running.encode(x)
        assert (one - full[:1]).abs().max().item() <= 1e-5
        assert (full[:, :16] - batch.encode(x)[:, :16]).abs().max().item() == 0  # VFM part
    # training updates the moving average from the batch's statistics
    running.train()
    before = running.match_stats.clone()
    running.encode(x)  # (the fixture decoder is f2: no loss here)
    assert int(running.match_count) == 3 and not torch.equal(running.match_stats, before)
    sd = running.state_dict()
    assert "match_stats" in sd
    batch.load_trained(sd)  # a batch-mode model drops them


def test_mask_token_replaces_the_residual_in_training():
    model, weights, t = fixture_model("none", mask_prob=1.0)
    model.load_state_dict({k: v for k, v in weights.items() if not k.startswith("norm_vit")})
    x = t["input.x"]
    model.train()
    _, r = model.features(x)
    assert torch.equal(r, model.mask_token.view(1, -1, 1, 1).expand_as(r))
    assert model.encode(x)[:, 16:].requires_grad  # the mask token is learned
    model.eval()
    _, r = model.features(x)
    assert (r - model.mask_token.view(1, -1, 1, 1)).abs().max() > 1e-3


def test_named_configs_latent_shapes_and_round_trip():
    family = TOKENIZERS.get("svg")
    assert family.normalization == "channel"
    assert family.latent_shape(SVGConfig(config="dinov3-s16p"), 256) == (392, 16, 16)
    dino_only = SVGConfig(config="dinov3-s16p", residual_channels=0)
    assert family.latent_shape(dino_only, 256) == (384, 16, 16)
    assert family.latent_shape(SVGConfig(config="shapes"), 32) == (136, 8, 8)
    with pytest.raises(ValueError, match="256x256"):
        family.latent_shape(SVGConfig(config="dinov3-s16p"), 512)
    with pytest.raises(KeyError, match="dinov3-s16p"):
        family.check(SVGConfig(config="nope"))
    model = build_svg(SVGConfig(config="tiny"), 32).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model.calibrate_match(x)
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (2, *model.latent_shape(32)) == (2, 132, 8, 8)
        assert model.decode(z).shape == x.shape
    names = set(model.state_dict())
    assert {"extra_vit.conv_proj.weight", "extra_vit.class_token", "mask_token"} <= names
    assert "extra_vit.encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in names
    assert {"extra_vit.heads.0.weight", "extra_vit.heads.2.weight"} <= names
    assert not any(k.startswith(("vfm", "encoder.")) for k in names)  # the VFM is frozen
    assert all(k.startswith(("extra_vit.", "mask_token", "decoder.")) for k, _ in
               model.named_parameters())  # fmt: skip
    copy = build_svg(SVGConfig(config="tiny"), 32).eval()
    copy.load_trained(model.state_dict())
    with torch.no_grad():
        assert torch.equal(copy.encode(x), z)
    vfm_only = build_svg(SVGConfig(config="tiny", residual_channels=0), 32).eval()
    with torch.no_grad():
        assert torch.equal(vfm_only.encode(x), z[:, :128])


def test_published_stats_file_is_read_and_sliced(tmp_path):
    """``dinov3_sp_stats.pt``: ``dinov3_sp_mean`` / ``dinov3_sp_std`` (1, 1, 392)."""
    mean, std = torch.randn(1, 1, 392), torch.rand(1, 1, 392) + 0.5
    torch.save({"dinov3_sp_mean": mean, "dinov3_sp_std": std}, tmp_path / "stats.pt")
    full = read_published_stats(str(tmp_path / "stats.pt"), 392)
    assert torch.allclose(torch.tensor(full["std"], dtype=torch.float64), std.flatten().double())
    # the platform's reader (generator.latent_stats) takes the file as it is
    platform = read_latent_stats(tmp_path / "stats.pt", (392, 16, 16))
    assert platform["mean"] == full["mean"]
    dino = read_published_stats(str(tmp_path / "stats.pt"), 384)
    assert dino["mean"] == full["mean"][:384] and len(dino["std"]) == 384
    with pytest.raises(ValueError, match="392 values for 400"):
        read_published_stats(str(tmp_path / "stats.pt"), 400)
    with pytest.raises(FileNotFoundError, match="dinov3_sp_stats.pt"):
        read_published_stats(str(tmp_path / "absent.pt"), 392)


# ----------------------------------------------------------------------------- training


def test_loss_l1_lpips_and_adaptive_gan():
    """L1 + LPIPS (weight 1) from the start; the hinge generator term x disc_weight x the
    adaptive weight only from ``disc_start`` images on; the discriminator's hinge loss."""
    pytest.importorskip("lpips")
    cfg = SVGConfig(config="tiny", perceptual="lpips", disc_weight=0.5, disc_start=64)
    model = build_svg(SVGConfig(config="tiny"), 32)
    model.cfg = cfg
    model._frozen["perceptual"] = losses.LPIPSLoss("alex", pretrained_backbone=False)
    disc = model.make_discriminator()
    assert isinstance(disc, losses.NLayerDiscriminator)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model.train()
    early = model.loss(x, 0, discriminator=disc)
    assert "g_loss" not in early and "fake" not in early
    assert early["loss"].item() == pytest.approx(
        early["recon"].item() + early["perceptual_lpips"].item(), rel=1e-5
    )
    assert early["perceptual_lpips"].item() > 0
    late = model.loss(x, 64, discriminator=disc)
    w = late["g_weight_eff"].item()
    assert 0 < w <= 0.5 * cfg.disc_max_weight / x[0].numel() and w != 0.5
    late["loss"].backward()
    assert model.extra_vit.conv_proj.weight.grad is not None
    d = model.discriminator_loss(disc, x, late["fake"])
    assert d["loss"].requires_grad and d["loss"].item() > 0
    assert model.gan_active(64) and not model.gan_active(63)
    assert model.discriminator_optimizer(1e-4)["disc_betas"] == (0.5, 0.9)


def test_training_masks_residuals_with_probability_mask_prob():
    model = build_svg(SVGConfig(config="tiny", mask_prob=0.5, match="none"), 32).train()
    torch.manual_seed(0)
    x = torch.rand(64, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        _, r = model.features(x)
    token = model.mask_token.view(1, -1, 1, 1).expand_as(r[:1])
    masked = sum(torch.equal(r[i : i + 1], token) for i in range(len(x)))
    assert 16 <= masked <= 48


# ----------------------------------------------------------------------------- DINOv3 VFMs


def test_hf_dinov3_features_are_normalised_patch_tokens(tmp_path):
    """transformers' DINOv3 (``hf:`` dir): patch tokens after its final norm, registers and
    the class token dropped (as ``x_norm_patchtokens``)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DINOv3ViTModel"):
        pytest.skip("transformers without DINOv3")
    config = transformers.DINOv3ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
        num_register_tokens=4,
    )
    torch.manual_seed(0)
    transformers.DINOv3ViTModel(config).save_pretrained(tmp_path / "dinov3")
    vfm = load_vfm(f"hf:{tmp_path / 'dinov3'}")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = vfm(x)
    ref = vfm.model(pixel_values=vfm.prepare(x)).last_hidden_state[:, 5:]  # (B, 4, 32)
    assert out.patch[-1].shape == (2, 32, 2, 2)
    assert torch.allclose(out.patch[-1].flatten(2).transpose(1, 2), ref, atol=1e-6)


def test_hub_vfm_from_a_local_repository(tmp_path):
    """``hub:<dir>:<entry>`` with an explicit weights file: ``x_norm_patchtokens``."""
    from latentforge.tokenizers.vfm import check_vfm_spec

    repo = tmp_path / "dinov3"
    repo.mkdir()
    (repo / "hubconf.py").write_text(
        "import torch\n"
        "from timm.models.vision_transformer import VisionTransformer\n"
        "class Net(VisionTransformer):\n"
        "    def forward_features(self, x):\n"
        "        t = super().forward_features(x)\n"
        "        return {'x_norm_patchtokens': t[:, 1:], 'x_norm_clstoken': t[:, 0]}\n"
        "def tiny(weights=None):\n"
        "    m = Net(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2, num_classes=0)\n"
        "    m.load_state_dict(torch.load(weights, weights_only=True))\n"
        "    return m\n"
    )
    from timm.models.vision_transformer import VisionTransformer

    net = VisionTransformer(
        img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2, num_classes=0
    )
    torch.save(net.state_dict(), tmp_path / "w.pth")
    spec = f"hub:{repo}:tiny"
    with pytest.raises(ValueError, match="vfm_weights"):
        check_vfm_spec("tokenizer.vfm", spec, None)
    check_vfm_spec("tokenizer.vfm", spec, str(tmp_path / "w.pth"))
    with pytest.raises(FileNotFoundError, match="tokenizer.vfm_weights"):
        load_vfm(spec)
    vfm = load_vfm(spec, weights=str(tmp_path / "w.pth"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = vfm(x)
    with torch.no_grad():
        ref = net.forward_features(vfm.prepare(x))[:, 1:]
    assert out.patch[-1].shape == (2, 16, 2, 2) and out.cls.shape == (2, 16)
    assert torch.allclose(out.patch[-1].flatten(2).transpose(1, 2), ref, atol=1e-6)


def test_tokenizer_fit_on_the_platform_path(tmp_path):
    """SVG's objective on experiments/shapes/svg.yaml (VFM perceptual term, PatchGAN from
    ``disc_start``) through the training loop on a few batches: the GAN phase switches on,
    the running match statistics are saved with the weights and load for inference."""
    import numpy as np

    from latentforge.config import load_experiment
    from latentforge.models import load_tokenizer
    from latentforge.shapes import render_shapes
    from latentforge.training.loop import fit, tokenizer_job
    from latentforge.training.runtime import LocalRuntime

    cfg = load_experiment(
        ROOT / "experiments" / "shapes" / "svg.yaml",
        [
            f"run_dir={tmp_path}",
            "tokenizer.config=tiny",
            "tokenizer.perceptual=vfm",  # the published terms; the shapes file has neither
            "tokenizer.disc_weight=0.5",
            "tokenizer.disc_layers=2",
            "tokenizer.disc_start=32",
            "tokenizer.disc_channels=8",
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
    assert np.isfinite(out["curve"][-1]["perceptual_vfm"]) and "g_loss" in out["curve"][-1]
    assert int(job.model.match_count) == 4
    model = load_tokenizer(cfg, tmp_path / "checkpoint" / "model.safetensors")
    assert model.perceptual is None and int(model.match_count) == 4
    x = torch.from_numpy(images[:4]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W)
    with torch.no_grad():
        assert (model.encode(x[:1]) - model.encode(x)[:1]).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- SVG-XL


def test_official_svg_dit_loads_strictly_and_outputs_match(tmp_path):
    """``shiml20/SVG`` ``models/models_SVG.py`` ``DiT`` (tiny: depth 2, width 32, 2 heads,
    6 channels on a 16x16 grid; qk-norm as LayerNorm, learned sigma, ``ln1`` input): our
    LightningDiT with the SVG-XL flags. Its time convention is ours (t in [0, 1], 1 = data,
    unscaled in the embedder): the same t goes in unchanged. Tokens (N, T, C) are the
    latent's row-major grid; of its 2C output channels the flow uses the first C."""
    from dataclasses import replace

    from latentforge.generators.lightningdit import CONFIGS, LightningDiT, load_published

    with safe_open(str(FIXTURE.with_name("svg_dit.safetensors")), "pt") as f:
        kw = json.loads(f.metadata()["kwargs"])
    t = load_file(str(FIXTURE.with_name("svg_dit.safetensors")))
    weights = {k[len("weight.") :]: v.float() for k, v in t.items() if k.startswith("weight.")}
    arch = replace(
        CONFIGS["SVG-XL"], depth=kw["depth"], hidden=kw["hidden_size"], heads=kw["num_heads"]
    )
    c, s = kw["in_channels"], kw["input_size"]
    model = LightningDiT(arch, (c, s, s), kw["num_classes"], class_dropout=0.1).eval()
    # our fixed sin-cos table is the official one (fixture: fp16-rounded)
    assert (model.pos_embed - weights["pos_embed"]).abs().max().item() < 1e-3
    model.load_state_dict(weights, strict=True)
    x = t["input.x"].transpose(1, 2).reshape(-1, c, s, s)  # (N, T, C) -> (B, C, H, W)
    with torch.no_grad():
        out = model(x, t["input.t"], t["input.y"])
    ref = t["output"][..., :c].transpose(1, 2).reshape(-1, c, s, s)
    assert (out - ref).abs().max().item() <= 1e-5
    # the released file is {"ema": state_dict}: loaded strictly by the published loader
    torch.save({"ema": weights}, tmp_path / "svg_xl.pt")
    fresh = LightningDiT(arch, (c, s, s), kw["num_classes"]).eval()
    load_published(fresh, str(tmp_path / "svg_xl.pt"))
    with torch.no_grad():
        assert torch.equal(fresh(x, t["input.t"], t["input.y"]), out)
    with pytest.raises(FileNotFoundError, match="howlin/SVG"):
        load_published(fresh, str(tmp_path / "absent.pt"))
    wide = LightningDiT(replace(arch, hidden=64), (c, s, s), kw["num_classes"])
    with pytest.raises(ValueError, match="other shapes"):
        load_published(wide, str(tmp_path / "svg_xl.pt"))


def test_svg_xl_config_shape():
    from latentforge.generators.lightningdit import CONFIGS, LightningDiT

    arch = CONFIGS["SVG-XL"]
    assert (arch.depth, arch.hidden, arch.heads, arch.patch) == (28, 1152, 16, 1)
    assert arch.input_linear and arch.use_qknorm and arch.learn_sigma and not arch.use_rope
    with torch.device("meta"):
        model = LightningDiT(arch, (392, 16, 16), 1000)
    sd = model.state_dict()
    assert sd["ln1.weight"].shape == (1152, 392) and "x_embedder.proj.weight" not in sd
    assert sd["final_layer.linear.weight"].shape == (784, 1152)
    assert sd["blocks.0.attn.q_norm.weight"].shape == (72,)
    assert model.blocks[0].attn.q_norm.eps == 1e-5


# ----------------------------------------------------------------------------- experiments


def test_imagenet_file_dry_runs_with_the_published_settings(tmp_path, capsys):
    """experiments/imagenet256/svg_dinov3_s16p.yaml: the CLI dry run plans every stage once
    its files exist, and names the published files' origin when one is missing."""
    from latentforge.cli import main
    from latentforge.config import load_experiment

    path = ROOT / "experiments" / "imagenet256" / "svg_dinov3_s16p.yaml"
    (tmp_path / "data" / "n01").mkdir(parents=True)
    for name in ("ae.ckpt", "dino.safetensors", "stats.pt"):
        (tmp_path / name).touch()
    files = [
        f"run_dir={tmp_path / 'run'}",
        f"data.path={tmp_path / 'data'}",
        f"tokenizer.weights={tmp_path / 'ae.ckpt'}",
        f"tokenizer.vfm_weights={tmp_path / 'dino.safetensors'}",
        f"generator.latent_stats={tmp_path / 'stats.pt'}",
    ]
    assert main(["run", str(path), *files, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(f"{stage} " in out for stage in ("tokenizer", "extract", "generator", "sample"))
    assert main(["run", str(path), *files[:2], "--dry-run"]) == 2
    assert "howlin/SVG" in capsys.readouterr().err
    cfg = load_experiment(path, files)
    transport, sample = cfg.generator.transport, cfg.sample
    assert (transport.t_sampling, transport.train_shift, transport.cos_loss_weight) == (
        "uniform",
        0.4,
        0.0,
    )
    assert (sample.sampler, sample.steps, sample.cfg_scale, sample.timestep_shift) == (
        "euler",
        25,
        4.0,
        0.15,
    )
    assert sample.cfg_channels is None and tuple(sample.cfg_interval) == (0.0, 1.0)
    assert cfg.generator.config == "SVG-XL" and cfg.tokenizer.match == "batch"


def test_timm_dinov3_layout_gives_x_norm_patchtokens():
    """timm's DINOv3 (an Eva with RoPE and 4 registers, ``timm:vit_*_dinov3``) through the
    timm VFM: the final-norm patch tokens, prefix tokens dropped."""
    from timm.models.eva import Eva

    torch.manual_seed(0)
    eva = Eva(
        img_size=32,
        patch_size=16,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=0,
        num_reg_tokens=4,
        use_rot_pos_emb=True,
        use_abs_pos_emb=False,
        rope_type="dinov3",
    ).eval()
    vfm = TimmVFM(eva, "timm-dinov3", None, True, None, IMAGENET_MEAN, IMAGENET_STD)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = eva.forward_features(vfm.prepare(x))[:, eva.num_prefix_tokens :]  # (B, N, C)
    assert eva.num_prefix_tokens == 5
    assert torch.allclose(vfm(x).patch[-1].flatten(2).transpose(1, 2), ref, atol=1e-6)


def test_match_stats_make_published_weights_batch_independent(tmp_path):
    """``tokenizer.match_stats``: running statistics for weights without any (calibrated once
    with calibrate_match); statistics saved with trained weights take precedence."""
    model = build_svg(SVGConfig(config="tiny"), 32).eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with pytest.raises(RuntimeError, match="match_stats"):
        model.encode(x)
    model.calibrate_match(x)
    stats = model.match_stats.tolist()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("match_")}
    torch.save({"state_dict": sd}, tmp_path / "published.ckpt")
    cfg = SVGConfig(config="tiny", weights=str(tmp_path / "published.ckpt"), match_stats=stats)
    loaded = build_svg(cfg, 32).eval()
    assert loaded.match_stats.tolist() == stats and int(loaded.match_count) == 1
    with torch.no_grad():
        assert (loaded.encode(x[:1]) - model.encode(x)[:1]).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="match_stats: 4 values"):
        TOKENIZERS.get("svg").check(SVGConfig(match_stats=[1.0, 2.0]))
