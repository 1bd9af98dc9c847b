"""The import graph of the Python packages: no cycles, and the layers keep to their rules.

Every ``import`` is read with ``ast`` (module level, inside functions and classes alike; relative
imports resolved against the file's package), so an import moved into a function to dodge a
cycle still counts: a cycle is broken by moving the shared piece, never by hiding it. Only
imports under ``if TYPE_CHECKING:`` are left out (they never run).

Layers: ``hairdiff_core`` never imports ComfyUI, the nodes, the CLI or training (it runs inside
ComfyUI and under the CLI alike); ``training`` never imports the nodes; nothing outside
``tests/`` imports ``tests/``, by name or by file path.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hairdiff_core", "hairdiff_cli", "training")
# ComfyUI's top-level modules a node pack can reach (its own "nodes" included).
COMFYUI = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server", "execution"}
LAYER_RULES = {
    "hairdiff_core": COMFYUI | {"hairdiff_cli", "training", "tests"},
    "training": {"nodes", "tests"},
    "hairdiff_cli": {"nodes", "tests"},
}
# Product code outside the packages: it must not reach into tests/ either.
OTHER_CODE = ("nodes", "bench", "tools", "workflows")
SKIP_DIRS = {"__pycache__", "build", ".git"}


def _py_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(ROOT).parts))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom, at any depth, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imports(path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, absolute module) for each import in ``path``; ``from P import name`` names the
    submodule ``P.name`` where there is one, else ``P``. A relative import that climbs out of the
    packages (``from ..nodes import x`` inside the pack) gives the top-level name it reaches."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
            continue
        if node.level:
            parts = package.split(".") if package else []
            up = node.level - 1
            base_parts = parts[: len(parts) - up] if up <= len(parts) else []
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            sub = f"{base}.{alias.name}" if base else alias.name
            found.append((node.lineno, sub if sub in known else base))
    return [(line, target) for line, target in found if target]


def _owner(target: str, known: set[str]) -> str | None:
    """The known module ``target`` is, or lies in (``a.b.c`` with ``a.b`` known gives ``a.b``)."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[int, str]]]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in _py_files(ROOT / pkg)}
    known = set(files)
    raw = {name: _imports(path, known) for name, path in files.items()}
    graph = {name: set() for name in files}
    for name, imports in raw.items():
        for _, target in imports:
            owner = _owner(target, known)
            if owner and owner != name:
                graph[name].add(owner)
    return graph, raw


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path (first module repeated at the end), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        path, iters = [start], [iter(sorted(graph[start]))]
        colour[start] = GREY
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                colour[path.pop()] = BLACK
                iters.pop()
            elif colour[nxt] == GREY:
                return path[path.index(nxt) :] + [nxt]
            elif colour[nxt] == WHITE:
                colour[nxt] = GREY
                path.append(nxt)
                iters.append(iter(sorted(graph[nxt])))
    return None


def test_the_graph_is_read_at_all():
    """The reader sees what it must: known edges, function-level ones included."""
    graph, _ = _graph()
    assert "hairdiff_core.models.memory" in graph["hairdiff_core.models.loading"]  # function-level
    assert "hairdiff_core.errors" in graph["hairdiff_core.method.mask"]  # relative, two dots
    assert "hairdiff_core.method.mask" in graph["hairdiff_core.data.datasets"]  # `from ..method import mask`
    assert "hairdiff_cli.commands.preflight" in graph["hairdiff_cli.commands.generate"]


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    graph, _ = _graph()
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_modules_do_not_import_the_package_front_door():
    """``hairdiff_core/__init__`` re-exports the entry points lazily; a core module importing the
    package root itself could close a cycle through them, so modules import each other directly."""
    _, raw = _graph()
    offenders = [
        f"{name}:{line}"
        for name, imports in raw.items()
        if name.startswith("hairdiff_core.")
        for line, target in imports
        if target == "hairdiff_core"
    ]
    assert offenders == []


@pytest.mark.parametrize("package", sorted(LAYER_RULES))
def test_layer_rules(package):
    banned = LAYER_RULES[package]
    _, raw = _graph()
    offenders = [
        f"{name}:{line} imports {target}"
        for name, imports in raw.items()
        if name == package or name.startswith(package + ".")
        for line, target in imports
        if target.split(".")[0] in banned
    ]
    assert offenders == []


def _mentions_tests_folder(tree: ast.AST) -> list[int]:
    """Lines that name the tests folder as a path: ``ROOT / "tests"``, ``"tests/..."``."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.replace("\\", "/")
            if text == "tests" or (text.startswith("tests/") and " " not in text):
                lines.append(node.lineno)
    return lines


def test_nothing_outside_tests_imports_tests():
    offenders = []
    files = [p for folder in (*PACKAGES, *OTHER_CODE) for p in _py_files(ROOT / folder)]
    files += sorted(ROOT.glob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = path.relative_to(ROOT)
        for node in _import_nodes(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            offenders += [f"{rel}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "tests"]
        offenders += [f"{rel}:{line} reads a file under tests/" for line in _mentions_tests_folder(tree)]
    assert offenders == []


def test_the_front_door_is_light_and_complete():
    """``import hairdiff_core`` loads no torch (the nodes, the CLI's --help and every
    ``hairdiff_core.errors`` import run it), and every name it lists resolves."""
    import subprocess
    import sys

    script = (
        "import sys, hairdiff_core as H\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]\n"
        "assert set(H._LAZY) <= set(H.__all__), set(H._LAZY) - set(H.__all__)\n"
        "missing = [n for n in H.__all__ if getattr(H, n, None) is None]\n"
        "assert not missing, missing\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
