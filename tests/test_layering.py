"""Layering contract of the package (docs/architecture.md#layers): every `rskd_jax` import, module-level or
inside a function, goes to the same or a lower layer, and the module import graph has no cycle.

Parsed with `ast` (nothing is imported), so the test takes well under a second. Also checked here: no function
in the package is longer than 80 lines (issue 18).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "rskd_jax"

# Lowest first. A module's layer is that of its sub-package (or top-level module) under rskd_jax.
LAYERS = (
    ("parallel",),
    ("models",),
    ("convert",),
    ("build", "pretrained"),
    ("data", "distill"),
    ("eval",),
    ("train",),
    ("serve",),
    ("cli", ""),  # "" is the package's own __init__ (lazy `load_pretrained`)
)
# (importer, imported) pairs allowed to go upward: compatibility re-exports only, each with its reason.
ALLOWED_UPWARD = {
    # old location of convert.from_torch, still imported by bench/common.py
    ("rskd_jax.models.from_torch", "rskd_jax.convert.from_torch"),
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports(name: str, path: pathlib.Path, known) -> list[tuple[str, int, bool]]:
    """(imported rskd_jax module, line, at module level) for every import statement of the file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in ast.walk(tree) if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    inside = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(fn)}
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t == "rskd_jax" or t.startswith("rskd_jax."):
                while t not in known:  # `import rskd_jax.x.y.attr` style: the longest module prefix
                    t = t.rpartition(".")[0]
                out.append((t, node.lineno, id(node) in top and id(node) not in inside))
    return out


def layer(mod: str) -> int:
    head = mod.split(".")[1] if "." in mod else ""
    head = head.removesuffix(".py")
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"{mod}: its sub-package {head!r} has no layer in LAYERS (tests/test_layering.py)")


def graph():
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def test_every_module_has_a_layer():
    for m in modules():
        layer(m)


def test_no_upward_imports():
    bad = [
        f"{m}:{line} imports {t} (layer {layer(m)} -> {layer(t)})"
        for m, edges in graph().items()
        for t, line, _ in edges
        if layer(t) > layer(m) and (m, t) not in ALLOWED_UPWARD
    ]
    assert not bad, "upward imports (see docs/architecture.md#layers):\n" + "\n".join(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("module_level_only", [True, False], ids=["module-level", "all-imports"])
def test_no_import_cycles(module_level_only):
    g = graph()
    edges = {m: {t for t, _, top in e if t != m and (top or not module_level_only)} for m, e in g.items()}
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_checker_finds_upward_imports_and_cycles():
    """The checker itself: a cycle and an upward import in a made-up graph are reported."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert layer("rskd_jax.models.llava") < layer("rskd_jax.convert.importer") < layer("rskd_jax.train.run")
    assert layer("rskd_jax.parallel.mesh") < layer("rskd_jax.models.llava")


MAX_FUNCTION_LINES = 80  # issue 18: a function that needs a scroll bar wants splitting


def long_functions(root: pathlib.Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """`path:line name (n lines)` for every function or method under `root` longer than `limit` lines."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_over_80_lines_in_the_package():
    found = long_functions(PKG)
    assert not found, "split these (docs/architecture.md):\n" + "\n".join(found)


def test_long_function_check_finds_a_long_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (pkg / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n    return x0\n")
    assert long_functions(pkg) == [f"pkg/m.py:5 long ({MAX_FUNCTION_LINES + 2} lines)"]
