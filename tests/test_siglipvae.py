"""Siglip-VAE (tokenizers/siglipvae.py): parity with the official training module, loading
rules, the fused latent, the frozen projections and the contrastive term.

``fixtures/siglipvae.safetensors`` holds a tiny official ``AutoencoderKL`` of
sigma-alpha-beta/Siglip-VAE (``use_vf=siglip, reverse_proj=True``; random non-zero weights,
fp32, eval, CPU) with its frozen tiny SigLIP (``vfm.*``), inputs (images, text embeddings)
and the official outputs: posterior mean and log-variance, the fused latent the decoder
reads (z + linear_proj_cat(SigLIP)), its decoding, and the loss module's VF and contrastive
terms (see fixtures/README.md).
"""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from latentforge.tokenizers import losses
from latentforge.tokenizers.ldm_blocks import AEArch
from latentforge.tokenizers.siglipvae import (
    CONFIGS,
    SiglipVAE,
    SiglipVAEConfig,
    latent_shape,
    load_published,
)
from latentforge.tokenizers.text import HashTextEncoder, TextEncoder

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "siglipvae.safetensors"
CAPTIONS = ["a", "b", "c"]


def fixture():
    """The fixture's tensors, kwargs and tiny SigLIP as our frozen HF VFM (fed the raw
    [-1, 1] image, as the official code does)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from latentforge.tokenizers.vfm import HFVFM

    with safe_open(str(FIXTURE), "pt") as f:
        meta = f.metadata()
    t = load_file(str(FIXTURE))
    siglip = SiglipVisionModel(SiglipVisionConfig(**json.loads(meta["vfm_config"])))
    siglip.load_state_dict({k[4:]: v.float() for k, v in t.items() if k.startswith("vfm.")})
    vfm = HFVFM(siglip, "hf:tiny-siglip", None, False, None, (0.5,) * 3, (0.5,) * 3)
    return t, json.loads(meta["kwargs"]), vfm


class FixedText(TextEncoder):
    """The fixture's text embeddings for the captions a, b, c."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.rows, self.dim = rows, rows.shape[1]

    def forward(self, captions):
        return self.rows[[CAPTIONS.index(c) for c in captions]]


def fixture_model(**kw):
    t, kwargs, vfm = fixture()
    dd = kwargs["ddconfig"]
    levels = len(dd["ch_mult"])
    attn = tuple(i for i in range(levels) if dd["resolution"] // 2**i in dd["attn_resolutions"])
    arch = AEArch(dd["ch"], tuple(dd["ch_mult"]), dd["num_res_blocks"], attn, dd["z_channels"])
    loss = kwargs["loss"]
    fields = dict(vf_margin_cos=loss["cos_margin"], vf_margin_dist=loss["distmat_margin"])
    fields |= dict(vf_weight=loss["vf_weight"], perceptual="none", sample_posterior=False)
    cfg = SiglipVAEConfig(config="tiny", **(fields | kw))
    model = SiglipVAE(arch, cfg, vfm, text=FixedText(t["input.text"])).eval()
    weights = {k[7:]: v.float() for k, v in t.items() if k.startswith("weight.")}
    return model, weights, t


def close(ours: torch.Tensor, ref: torch.Tensor, key: str) -> None:
    assert ours.shape == ref.shape, key
    assert (ours - ref).abs().max().item() <= 1e-5, key


def test_official_weights_load_strictly_and_outputs_match():
    model, weights, t = fixture_model()
    assert {"linear_proj_cat.bias", "linear_proj_text.weight", "logit_scale"} <= set(weights)
    model.load_state_dict(weights, strict=True)
    x = t["input.x"]
    with torch.no_grad():
        mean, logvar = model.moments(x)
        fused = model.encode(x)
        for ours, key in ((mean, "mean"), (logvar, "logvar"), (fused, "fused")):
            close(ours, t[f"output.{key}"], key)
        close(model.vfm_features(x), t["output.vfm"], "vfm")
        close(model.decode(fused), t["output.decoded"], "decoded")
        out = model.loss(x, 0, captions=CAPTIONS)  # eval: the terms without adaptive weights
    close(out["vf"].reshape(1), t["output.vf_loss"], "vf_loss")
    close(out["contrastive"].reshape(1), t["output.ct_loss"], "ct_loss")


def official_file(tmp_path, weights: dict, name="siglipvae.ckpt") -> str:
    """``weights`` as a checkpoint of the official training code: a Lightning state_dict
    with the loss module's and the frozen SigLIP's entries."""
    extra = {
        "loss.logvar": torch.zeros(()),
        "loss.discriminator.main.0.weight": torch.ones(2),
        "foundation_model.model.vision_model.post_layernorm.weight": torch.ones(16),
        "foundation_model.model.text_model.head.weight": torch.ones(16, 16),
    }
    torch.save({"state_dict": {**weights, **extra}}, tmp_path / name)
    return str(tmp_path / name)


def test_official_checkpoint_loads_dropping_loss_and_foundation_model(tmp_path):
    model, weights, t = fixture_model()
    load_published(model, official_file(tmp_path, weights))
    with torch.no_grad():
        close(model.decode(model.encode(t["input.x"])), t["output.decoded"], "decoded")
    with pytest.raises(FileNotFoundError, match="not published"):
        load_published(model, str(tmp_path / "absent.ckpt"))


def test_other_checkpoints_fail_naming_keys_and_expectation(tmp_path):
    model, weights, _ = fixture_model()
    vavae = {k: v for k, v in weights.items() if not k.startswith(("linear_proj_", "logit"))}
    with pytest.raises(ValueError, match=r"expected latent channels 4, VFM width 16.*missing "):
        load_published(model, official_file(tmp_path, vavae, "vavae.ckpt"))
    wider = dict(weights, **{"linear_proj_cat.weight": torch.zeros(4, 32, 1, 1)})
    file = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in wider.items()}, str(file))
    with pytest.raises(ValueError, match=r"other shapes \[\('linear_proj_cat.weight'"):
        load_published(model, str(file))


def test_latent_shape_and_published_sizes():
    assert latent_shape(SiglipVAEConfig(config="f16d32-siglip2"), 256) == (32, 16, 16)
    assert latent_shape(SiglipVAEConfig(config="shapes"), 32) == (4, 8, 8)
    with pytest.raises(ValueError, match="not divisible"):
        latent_shape(SiglipVAEConfig(config="f16d32-siglip2"), 200)
    cfg = SiglipVAEConfig(config="f16d32-siglip2", perceptual="none")
    with torch.device("meta"):  # shapes only
        sd = SiglipVAE(CONFIGS[cfg.config], cfg, None, vfm_dim=1152).state_dict()
    assert sd["linear_proj.weight"].shape == (1152, 32, 1, 1)  # reverse_proj: no bias
    assert sd["linear_proj_cat.weight"].shape == (32, 1152, 1, 1)
    assert sd["linear_proj_text.weight"].shape == (32, 1152) and sd["logit_scale"].shape == ()


def test_fused_latent_is_z_plus_projected_features():
    model, weights, t = fixture_model()
    model.load_state_dict(weights)
    x = t["input.x"]
    with torch.no_grad():
        mean = model.moments(x)[0]
        feats = model.vfm_features(x)
        assert torch.allclose(model.encode(x) - mean, model.linear_proj_cat(feats), atol=1e-6)
        sampled = model.encode(x, sample=True)
        assert not torch.allclose(sampled, model.encode(x))
        model.linear_proj_cat.weight.zero_()
        model.linear_proj_cat.bias.zero_()
        assert torch.allclose(model.encode(x), mean)
        with pytest.raises(ValueError, match="patch grid"):
            model.encode(torch.zeros(1, 3, 32, 32))  # 2x2 latent, the VFM's 4x4 grid


def test_official_optimiser_leaves_the_projections_at_init():
    from latentforge.training.loop import Job, make_optimizers

    def trained(**kw):
        model = fixture_model(**kw)[0]
        job = Job("tokenizer", model, model, 1, 1, 1e-4, 0.0)
        opt, _ = make_optimizers(job, SimpleNamespace(weight_decay=0.0))
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        return {n.split(".")[0] for n, p in model.named_parameters() if id(p) in ids}

    published = trained()
    assert {"encoder", "decoder", "quant_conv", "post_quant_conv", "linear_proj"} == published
    assert trained(train_fusion_proj=True) == published | {"linear_proj_cat"}
    both = trained(train_fusion_proj=True, train_text_proj=True)
    assert both == published | {"linear_proj_cat", "linear_proj_text", "logit_scale"}


def test_contrastive_term_is_off_without_captions_and_on_with_them():
    model, weights, t = fixture_model(sample_posterior=True)
    model.load_state_dict(weights)
    model.train()
    x = t["input.x"]
    torch.manual_seed(0)
    plain = model.loss(x, 0)
    torch.manual_seed(0)
    with_text = model.loss(x, 0, captions=CAPTIONS)
    assert "contrastive" not in plain and "vf" in plain
    weight = with_text["contrastive_weight_eff"]
    assert weight > 0 and with_text["contrastive"] > 0
    extra = with_text["loss"] - plain["loss"]
    assert torch.allclose(extra, weight * with_text["contrastive"], rtol=1e-4, atol=1e-5)
    model.zero_grad()
    with_text["loss"].backward()
    assert model.encoder.conv_out.weight.grad.abs().sum() > 0
    assert model.linear_proj_text.weight.grad is None  # frozen as published
    model._frozen["text"] = None
    with pytest.raises(ValueError, match="text_encoder is unset"):
        model.loss(x, 0, captions=CAPTIONS)


def test_contrastive_loss_matches_clip_and_groups_shared_captions():
    gen = torch.Generator().manual_seed(0)
    img, txt = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    logits = (
        3.0
        * torch.nn.functional.normalize(txt, dim=1)
        @ torch.nn.functional.normalize(img, dim=1).T
    )
    arange = torch.arange(4)
    ref = 0.5 * (
        torch.nn.functional.cross_entropy(logits, arange)
        + torch.nn.functional.cross_entropy(logits.T, arange)
    )
    assert torch.allclose(losses.contrastive_loss(img, txt, 3.0), ref)
    assert torch.allclose(losses.contrastive_loss(img, txt, 3.0, arange), ref)
    # images 0 and 1 share a caption: each of their rows targets both images, half each
    same = torch.tensor([0, 0, 1, 2])
    target = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    grouped = 0.5 * (
        torch.nn.functional.cross_entropy(logits, target)
        + torch.nn.functional.cross_entropy(logits.T, target)
    )
    assert torch.allclose(losses.contrastive_loss(img, txt, 3.0, same), grouped)


def test_hash_text_encoder_is_fixed_per_caption():
    enc = HashTextEncoder(16)
    a = enc(["circle", "star", "circle"])
    assert a.shape == (3, 16) and torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])
    assert torch.equal(HashTextEncoder(16)(["star"])[0], a[1])


def test_hf_text_encoder_loads_offline_and_checks_its_width(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipModel

    from latentforge.tokenizers.text import load_text_encoder

    words = {"<pad>": 0, "<unk>": 1, "red": 2, "circle": 3}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    text = dict(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    text |= dict(num_attention_heads=2, max_position_embeddings=8)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    vision |= dict(num_attention_heads=2, image_size=32, patch_size=16)
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    enc = load_text_encoder(f"hf:{tmp_path}", 16, max_length=8)
    out = enc(["red circle", "circle"])
    assert out.shape == (2, 16) and not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match="text_dim=16"):
        load_text_encoder(f"hf:{tmp_path}", 32, max_length=8)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_text_encoder("hf:nobody/absent-siglip", 16)


EXPERIMENTS = [
    ROOT / "experiments/shapes/siglipvae.yaml",
    ROOT / "experiments/imagenet256/siglipvae_f16d32.yaml",
]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_files_load_and_dry_run(path, capsys, tmp_path):
    from latentforge.cli import main
    from latentforge.config import load_experiment

    cfg = load_experiment(path)
    assert cfg.tokenizer.name == "siglipvae" and isinstance(cfg.tokenizer, SiglipVAEConfig)
    assert not cfg.tokenizer.train_fusion_proj  # as published
    verb = "run" if "shapes" in path.parts else "train-tokenizer"
    assert main([verb, str(path), f"run_dir={tmp_path}", "--dry-run"]) == 0
    assert "tokenizer" in capsys.readouterr().out


def test_imagenet_file_follows_the_official_config():
    from latentforge.config import load_experiment

    cfg = load_experiment(EXPERIMENTS[1])
    tok = cfg.tokenizer
    assert tok.vfm == "hf:google/siglip2-so400m-patch16-256" and not tok.vfm_normalize
    assert (tok.vf_weight, tok.vf_margin_cos, tok.vf_margin_dist) == (0.5, 0.0, 0.0)
    assert (tok.disc_weight, tok.disc_start, tok.kl_weight) == (0.5, 4.8e5, 1e-6)
    assert cfg.train.tokenizer_batch_size == 192 and cfg.train.tokenizer_betas == [0.5, 0.9]
    assert latent_shape(tok, cfg.data.resolution) == (32, 16, 16)


def test_training_step_then_inference_build_keeps_the_vfm(tmp_path):
    """The shapes experiment through the plain training loop, which gives the contrastive
    term each image's class name as its caption; the inference build (what extraction and
    sampling use) keeps the frozen ViT, which encoding needs."""
    from latentforge.config import load_experiment
    from latentforge.models import load_tokenizer
    from latentforge.shapes import CLASS_NAMES, render_shapes
    from latentforge.training.loop import fit, tokenizer_job
    from latentforge.training.runtime import LocalRuntime

    overrides = ["train.tokenizer_images=16", "train.tokenizer_batch_size=8"]
    overrides += ["train.checkpoint_every_images=16", "tokenizer.text_encoder=hash"]
    cfg = load_experiment(EXPERIMENTS[0], overrides)
    images, labels = render_shapes(range(16), 32)
    runtime = LocalRuntime({"image": images, "label": labels}, tmp_path)
    job = tokenizer_job(cfg)
    fusion = job.model.linear_proj_cat.weight.detach().clone()
    out = fit(cfg, job, runtime, log=lambda *_: None)
    last = out["curve"][-1]
    assert out["nimg"] == 16 and all(np.isfinite(last[k]) for k in ("recon", "vf", "contrastive"))
    names = [CLASS_NAMES[int(i)] for i in labels[:3]]
    assert job.model.conditioning({"label": torch.as_tensor(labels[:3])}) == {"captions": names}
    assert torch.equal(job.model.linear_proj_cat.weight.detach().cpu(), fusion)
    model = load_tokenizer(cfg, next(tmp_path.rglob("ema.safetensors")))
    assert model.vfm is not None and model.text is None
    x = torch.as_tensor(images[:2]).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = model.encode(x)
    assert z.shape == (2, 4, 8, 8) and model.decode(z).shape == (2, 3, 32, 32)
    assert model.conditioning({"label": torch.as_tensor(labels)}) == {}  # no text encoder


def test_config_checks_name_the_key():
    from latentforge.config import ConfigError, load_experiment
    from latentforge.models import check_model_configs

    for override, key in (("tokenizer.vfm=null", "tokenizer.vfm"),
                          ("tokenizer.text_encoder=foo", "tokenizer.text_encoder"),
                          ("tokenizer.config=nosuch", "unknown tokenizer config")):  # fmt: skip
        cfg = load_experiment(EXPERIMENTS[0], [override])
        with pytest.raises(ConfigError, match=key):
            check_model_configs(cfg, generator=False)
