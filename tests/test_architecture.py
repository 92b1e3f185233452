"""The shape of the code: a pure core under a thin Ray layer, no import cycles, no family
named by the platform, files and functions of a readable size (DESIGN.md, STYLE.md)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_config import ROOT

SRC = ROOT / "src" / "latentforge"
PURE = [
    "latentforge.config",
    "latentforge.registry",
    "latentforge.models",
    "latentforge.images",
    "latentforge.data",
    "latentforge.shapes",
    "latentforge.state_dicts",
    "latentforge.report",
    "latentforge.frontier",
    "latentforge.asset_recipes",
    "latentforge.training.loop",
    "latentforge.training.runtime",
    "latentforge.training.checkpoint",
    "latentforge.training.objectives",
    "latentforge.tokenizers.vavae",
    "latentforge.tokenizers.vfm",
    "latentforge.tokenizers.losses",
    "latentforge.generators.lightningdit",
    "latentforge.generators.samplers",
    "latentforge.generators.generate",
    "latentforge.metrics.frechet",
    "latentforge.metrics.diagnostics",
    "latentforge.metrics.table",
    "latentforge.metrics.inception",
    "latentforge.metrics.reconstruction",
    "latentforge.metrics.shapesnet",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (functions included), except under
    ``if TYPE_CHECKING:`` (annotations only)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    out = set()
    package = module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def test_pure_modules_import_no_ray():
    """In a fresh interpreter: every pure module, the registered families and a loaded
    experiment YAML, and still no Ray in sys.modules."""
    code = "\n".join(
        [
            "import sys",
            *(f"import {m}" for m in PURE),
            "from latentforge.config import load_experiment",
            f"load_experiment({str(ROOT / 'experiments' / 'quickstart.yaml')!r})",
            "from latentforge.registry import TOKENIZERS, GENERATORS, DATASETS",
            "assert TOKENIZERS.names() and GENERATORS.names() and DATASETS.names()",
            "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))",
            "print(','.join(bad))",
        ]
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"Ray imported by the pure modules: {out.stdout[:300]}"


def test_only_the_platform_imports_ray_or_the_platform():
    for name, path in sources().items():
        if name.startswith("latentforge.platform") or name == "latentforge.cli":
            continue
        bad = {m for m in imports_of(path) if m.split(".")[0] == "ray"}
        bad |= {m for m in imports_of(path) if m.startswith("latentforge.platform")}
        assert not bad, f"{name} imports {sorted(bad)}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed ``graph`` as a list of nodes, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_in_src():
    """Module to module imports (function-level ones included) form no cycle."""
    modules = sources()
    graph = {
        name: {m for m in imports_of(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


FAMILY_NAMES = ("vavae", "lightningdit", "VAVAEConfig", "LightningDiTConfig", "VAVAE(")


def test_the_platform_names_no_family():
    for path in sorted((SRC / "platform").glob("*.py")):
        text = path.read_text()
        named = [w for w in FAMILY_NAMES if w in text]
        assert not named, f"{path.name} names {named}: add it to the family's registry entry"


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: p.name)
def test_files_and_functions_stay_readable(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= 500, f"{path.name}: {len(lines)} lines (budget 500)"
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            size = node.end_lineno - start + 1
            assert size <= 60, f"{path.name}:{node.lineno} {node.name}: {size} lines (budget 60)"
