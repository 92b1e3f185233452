"""Frozen caption encoders: captions (a list of strings) -> text embeddings (B, D).

``load_text_encoder(spec, dim)`` with ``spec`` one of

- ``hf:<repo id or local dir>`` — the text tower of a SigLIP / SigLIP2 model through
  transformers (``local_files_only=True``, never downloaded): its tokenizer pads and
  truncates every caption to ``max_length`` tokens, and the embedding is the tower's pooled
  output, before any normalisation (what ``SiglipModel.get_text_features`` returned in the
  transformers 4 releases that Siglip-VAE was trained with);
- ``hash`` — an offline stand-in with no weights: each distinct caption gets a fixed random
  Gaussian vector seeded by a hash of its text. It is not a language model (captions that
  mean the same get unrelated vectors); on the embedded ``shapes`` data, where the class
  name is the caption, it gives every class its own fixed direction.

The encoders are frozen (eval mode, no gradients) and are held by a tokenizer outside its
module tree, like its VFM (:class:`~latentforge.tokenizers.base.Tokenizer`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from latentforge.tokenizers.losses import Frozen


class TextEncoder(Frozen):
    """A frozen caption encoder of output width ``dim``."""

    dim: int

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        """Args: B captions. Returns embeddings float (B, dim), without gradients."""
        raise NotImplementedError


class HashTextEncoder(TextEncoder):
    """Offline stand-in: a fixed N(0, I) vector per distinct caption (seeded by BLAKE2b of
    its UTF-8 text), the same in every process and on every machine."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = int(dim)
        self.register_buffer("anchor", torch.zeros(()), persistent=False)  # follows .to()

    def vector(self, caption: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.blake2b(caption.encode(), digest_size=8).digest(), "little")
        gen = torch.Generator().manual_seed(seed & ((1 << 63) - 1))
        return torch.randn(self.dim, generator=gen)

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        rows = torch.stack([self.vector(c) for c in captions])  # (B, dim)
        return rows.to(self.anchor.device)


class HFTextEncoder(TextEncoder):
    """The text tower of a transformers SigLIP / SigLIP2 model and its tokenizer."""

    def __init__(self, tower: nn.Module, tokenizer, dim: int, max_length: int, name: str):
        super().__init__()
        self.tower = tower.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.dim = int(dim)
        self.max_length = int(max_length)
        self.name = name

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = next(self.tower.parameters()).device
        tokens = {k: v.to(device) for k, v in tokens.items() if k != "token_type_ids"}
        return self.tower(**tokens).pooler_output.float()  # (B, dim)


def load_hf_text(spec: str, repo: str, max_length: int) -> HFTextEncoder:
    """The text tower and tokenizer of a local SigLIP / SigLIP2 model (files only)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(repo, local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(
            f"text encoder {spec!r}: {repo}/config.json not found (local dir or hub cache). "
            f"Download it where there is network (`huggingface-cli download {repo}`) and copy "
            "the cache or the directory here."
        ) from e
    if not hasattr(config, "text_config"):
        raise ValueError(f"text encoder {spec!r}: {config.model_type} has no text tower")
    model = AutoModel.from_pretrained(repo, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(repo, local_files_only=True)
    tcfg = config.text_config
    dim = getattr(tcfg, "projection_size", None) or tcfg.hidden_size
    return HFTextEncoder(model.text_model, tokenizer, dim, max_length, spec)


def check_text_spec(key: str, spec: str | None) -> None:
    """A text encoder spec is ``hash`` or ``hf:<repo or dir>`` (an existing directory when
    given as a path)."""
    if spec is None or spec == "hash":
        return
    kind, _, name = spec.partition(":")
    if kind != "hf" or not name:
        raise ValueError(f"{key}: {spec!r}: expected hash or hf:<repo or dir>")
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
        raise ValueError(f"{key}: {spec!r}: directory {name} does not exist")


def load_text_encoder(spec: str, dim: int, max_length: int = 64) -> TextEncoder:
    """The frozen caption encoder of ``spec`` (see the module docstring); its width must be
    ``dim`` (the width of the tokenizer's text projection)."""
    check_text_spec("tokenizer.text_encoder", spec)
    if spec == "hash":
        return HashTextEncoder(dim)
    encoder = load_hf_text(spec, spec.partition(":")[2], max_length)
    if encoder.dim != dim:
        raise ValueError(
            f"tokenizer.text_encoder {spec!r} gives {encoder.dim}-d embeddings; the text "
            f"projection takes {dim}: set tokenizer.text_dim={encoder.dim}"
        )
    return encoder
