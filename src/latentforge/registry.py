"""One name -> family registry per kind of part (data source, tokenizer, generator).

A polymorphic part of an experiment (``data.name``, ``tokenizer.name``, ``generator.name``)
is resolved here: the config loader looks up the family's schema dataclass by name and
merges the YAML subtree into it; :mod:`latentforge.models` builds and loads the family's
model through the same entry. An entry says everything the platform needs to know about a
family, so that nothing outside the family's own module names it:

- ``config``: the schema (derived from the kind's base schema in :mod:`latentforge.config`);
- ``builder``: ``builder(cfg, ...) -> nn.Module``;
- ``latent_shape``: a tokenizer's latent shape for a resolution, without building it:
  ``(C, H, W)`` grids or ``(C, N)`` 1-D tokens;
- ``normalization``: how the latents are normalised for the generator: per ``channel``,
  per ``element`` (every position of the latent its own mean/std) or ``scalar``;
- ``check``: the family's own config checks (raises ``KeyError``/``ValueError`` naming the key);
- ``check_training``: checks of what only training needs (a frozen VFM's files, ...);
- ``inference``: config values that only training needs, reset when the model is built to
  encode and decode (extraction, sampling, evaluation), so that other nodes need no
  training-only files;
- ``load_published`` / ``weights_hint``: strict loading of published weights, and where to
  get them when the file is missing.

Modules register themselves on import; built-in modules are imported lazily, and further
ones come from an experiment's ``plugins:``. Importing this module, or loading a YAML file,
imports no Ray.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Normalization = Literal["channel", "element", "scalar"]


@dataclass(frozen=True)
class Entry:
    """One registered family."""

    name: str
    config_cls: type | None
    builder: Callable[..., Any] | None = None
    latent_shape: Callable[[Any, int], tuple[int, ...]] | None = None
    normalization: Normalization = "channel"
    check: Callable[[Any], None] | None = None
    check_training: Callable[[Any], None] | None = None
    inference: dict[str, Any] = field(default_factory=dict)
    load_published: Callable[[Any, str], None] | None = None
    weights_hint: str = ""


class Registry:
    """Names of one kind of part (tokenizer, generator, dataset)."""

    def __init__(self, kind: str, builtin_modules: tuple[str, ...] = ()):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._builtin_modules = builtin_modules
        self._loaded = False

    def register(self, name: str, config: type | None = None, **family: Any):
        """Decorator on a builder: ``@TOKENIZERS.register("vavae", config=VAVAEConfig,
        latent_shape=..., ...)`` (the keywords are :class:`Entry` fields)."""

        def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
            self.add(Entry(name, config, builder, **family))
            return builder

        return wrap

    def add(self, entry: Entry) -> None:
        old = self._entries.get(entry.name)
        if old is not None and old.builder is not entry.builder:
            raise ValueError(f"{self.kind} {entry.name!r} is registered twice")
        self._entries[entry.name] = entry

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._builtin_modules:
                importlib.import_module(module)

    def get(self, name: str) -> Entry:
        self._load()
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        entry = self.get(name)
        if entry.builder is None:
            raise KeyError(f"{self.kind} {name!r} has no builder")
        return entry.builder(*args, **kwargs)


TOKENIZERS = Registry(
    "tokenizer",
    (
        "latentforge.tokenizers.vavae",
        "latentforge.tokenizers.rae",
        "latentforge.tokenizers.svg",
        "latentforge.tokenizers.vfmvae",
        "latentforge.tokenizers.siglipvae",
        "latentforge.tokenizers.token1d",
    ),
)
GENERATORS = Registry(
    "generator",
    (
        "latentforge.generators.lightningdit",
        "latentforge.generators.ditdh",
        "latentforge.generators.sit",
    ),
)
DATASETS = Registry("dataset", ("latentforge.data",))


def load_plugins(specs: list[str] | tuple[str, ...]) -> None:
    """Import the modules that register further families: a module name
    (``mypackage.families``) or a Python file's path (``/shared/code/my_family.py``; on a
    cluster, a path every node sees). A file is imported once, under a name derived
    from its path, so every process that rebuilds the experiment registers the same
    families."""
    for spec in specs:
        if not spec.endswith(".py") and "/" not in spec:
            importlib.import_module(spec)
            continue
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"plugins: {spec}: no such file")
        digest = hashlib.blake2b(str(path).encode(), digest_size=6).hexdigest()
        name = f"latentforge_plugin_{path.stem}_{digest}"
        if name in sys.modules:
            continue
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
