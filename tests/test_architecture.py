"""The package's shape, checked from its source: imports point one way (down the pipeline), no
module imports the package root, no import circle, no module over the size limit without a reason,
and docs/architecture.md names only modules that exist.

Run alone: ``.venv/bin/python -m pytest -q tests/test_architecture.py`` (no model, about a second).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "alignez_local"

# The layers, lowest first: a module may import its own package's modules and anything in a lower
# layer, nothing in its own layer's other packages and nothing above. The order is the pipeline's:
# measures and files and the engine at the bottom, AlignEZ itself on them, the evaluation on that,
# the orchestration, the Python API and the applications on top.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "version"),
    ("specs", "fileio", "progress", "remote_api"),
    ("measures", "formats", "llama"),
    ("models", "prompt_sets"),
    ("settings",),
    ("align",),
    ("evaluation",),
    ("pipeline", "testing"),
    ("api",),
    ("__init__",),
    ("apps",),
    ("__main__",),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}

MAX_LINES = 450
SIZE_REASON = re.compile(r"^# size: .+", re.MULTILINE)  # a file over MAX_LINES says why in such a comment


def modules() -> dict[str, Path]:
    """Return every module of the package by dotted name."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Return the package modules ``path`` imports, at any depth of the file (in functions and
    TYPE_CHECKING blocks too: a hint that needs an upward import is an upward dependency)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            # "from pkg import mod" names a module; "from mod import name" names the module.
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        found |= {t for t in targets if t == "alignez_local" or t.startswith("alignez_local.")}
    return found - {name}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def test_every_module_is_in_a_layer() -> None:
    missing = sorted({layer_of(m) for m in modules()} - set(RANK))
    assert not missing, f"give these a layer in LAYERS (and docs/architecture.md): {missing}"


def test_imports_point_down() -> None:
    bad = []
    for mod, deps in graph().items():
        for dep in deps:
            a, b = layer_of(mod), layer_of(dep)
            if dep == "alignez_local" and a not in ("apps", "__main__"):
                bad.append(f"{mod} -> the package root (import from the defining module)")
            elif a != b and RANK[b] >= RANK[a]:
                bad.append(f"{mod} -> {dep}")
    assert not bad, "imports that do not point down:\n" + "\n".join(sorted(bad))


def test_no_import_circle() -> None:
    g = graph()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for dep in sorted(g.get(node, ())):
            if dep == "alignez_local":
                continue  # the root imports the API; nothing below may import it (test above)
            if seen.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in seen:
                visit(dep, path + [dep])
        seen[node] = 2

    for mod in sorted(g):
        if mod not in seen:
            visit(mod, [mod])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_modules_stay_small_or_say_why() -> None:
    big = []
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_LINES and not SIZE_REASON.search(text):
            big.append(f"{name}: {text.count(chr(10))} lines")
    assert not big, f"over {MAX_LINES} lines with no '# size: why' comment:\n" + "\n".join(big)


@pytest.mark.parametrize("doc", ["docs/architecture.md"])
def test_the_architecture_doc_names_only_modules_that_exist(doc: str) -> None:
    text = (ROOT / doc).read_text(encoding="utf-8")
    # Paths written in the tree (indented names under their folder) and in prose (a/b.py).
    named = set(re.findall(r"\b([a-z_]+(?:/[a-z_]+)*\.py)\b", text))
    assert named, "the document names no module"
    files = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    names = {Path(f).name for f in files}
    missing = sorted(n for n in named if n not in files and not (("/" not in n) and n in names)
                     and not (ROOT / n).is_file())
    assert not missing, f"{doc} names modules that do not exist: {missing}"
    dotted = set(re.findall(r"`((?:pipeline|api|settings|models|progress|specs|fileio)\.[a-z_]+)", text))
    for ref in sorted(dotted):
        mod, attr = ref.split(".", 1)
        if attr == "py":
            continue  # a file name, checked above
        src = (PACKAGE / f"{mod}.py").read_text(encoding="utf-8")
        assert re.search(rf"^(def|class) {attr}\b|^{attr} =", src, re.MULTILINE), f"{doc}: {ref} does not exist"
