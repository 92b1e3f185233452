"""One name -> (config schema, builder) registry per kind of part.

A polymorphic part of an experiment (``data.name``, ``tokenizer.name``,
``generator.name``) is resolved here: the config loader looks up the schema
dataclass by name and merges the YAML subtree into it; the platform looks up the
builder by the same name. Modules register themselves on import; ``load_builtins``
imports the built-in modules lazily so that importing the registry stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    name: str
    config_cls: type | None
    builder: Callable[..., Any]


class Registry:
    """Names of one kind of part (tokenizer, generator, dataset, metric)."""

    def __init__(self, kind: str, builtin_modules: tuple[str, ...] = ()):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._builtin_modules = builtin_modules
        self._loaded = False

    def register(self, name: str, config: type | None = None):
        """Decorator: ``@TOKENIZERS.register("vavae", config=VAVAEConfig)`` on a builder."""

        def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries and self._entries[name].builder is not builder:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, config, builder)
            return builder

        return wrap

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
        return self.get(name).builder(*args, **kwargs)


TOKENIZERS = Registry("tokenizer", ("latentforge.tokenizers.vavae",))
GENERATORS = Registry("generator", ("latentforge.generators.lightningdit",))
DATASETS = Registry("dataset", ("latentforge.platform.data",))
