"""Imports run one way: core -> data -> service -> entry points, with no cycles.

Read from the source (every `import` and `from ... import`, inside functions too), so an
import hidden in a function to dodge a cycle counts like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vaegan"

# Lower layers first; a module may import from its own layer and the ones below it.
CORE = {"vaegan", "vaegan.errors", "vaegan.config", "vaegan.model", "vaegan.losses", "vaegan.step",
        "vaegan.ema", "vaegan.augment"}
ENTRY = {"vaegan.cli", "vaegan.demo"}
LAYERS = ("core", "data", "service", "entry")


def layer(module: str) -> str:
    if module in CORE:
        return "core"
    if module == "vaegan.data" or module.startswith("vaegan.data."):
        return "data"
    if module in ENTRY or module.startswith("jobs."):
        return "entry"
    return "service"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported vaegan module, names taken from it) for every import statement in `path`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "vaegan"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vaegan":
            names = [a.name for a in node.names]
            # `from vaegan import distributed` imports the module vaegan.distributed
            subs = [n for n in names if (PACKAGE / f"{n}.py").is_file() or (PACKAGE / n).is_dir()]
            if node.module == "vaegan" and subs:
                out += [(f"vaegan.{n}", []) for n in subs]
            else:
                out.append((node.module, names))
    return out


def sources() -> dict[str, Path]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    files.update({module_name(p): p for p in (ROOT / "jobs").glob("*.py")})
    return files


def graph() -> dict[str, set[str]]:
    files = sources()
    return {m: {t for t, _ in imports(p) if t != m and t in files} for m, p in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def upward(edges: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, targets in sorted(edges.items())
            for t in sorted(targets) if LAYERS.index(layer(t)) > LAYERS.index(layer(m))]


def test_no_layer_imports_one_above_it():
    assert upward(graph()) == []


def test_no_two_modules_import_each_other():
    assert cycles(graph()) == []


def test_no_module_imports_another_modules_private_names():
    found = [f"{m} takes {name} from {target}" for m, p in sorted(sources().items())
             for target, names in imports(p) if target != m for name in names
             if name.startswith("_") and not name.endswith("__")]
    assert found == []


def test_core_imports_no_framework():
    """Model and step code run on one device: no Ray, MLflow or torch.distributed."""
    banned = ("ray", "mlflow", "torch.distributed", "webdataset", "s3fs")
    found = []
    for m, p in sources().items():
        if layer(m) != "core":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{m} imports {n}" for n in names if n.split(".")[0] in banned or n.startswith(banned)]
    assert found == []


# The checks themselves, on graphs made up to break them.
@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_cycle_finder(edges, expected):
    assert cycles(edges) == expected


def test_upward_import_is_found():
    assert upward({"vaegan.step": {"vaegan.train"}, "vaegan.train": {"vaegan.step"}}) == [
        "vaegan.step (core) imports vaegan.train (service)"]
