"""The layout holds: the core imports neither timm nor transformers nor the layers above it; no import cycle."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "neat_vision"
CORE = ("methods", "layers", "batching", "conv", "targets", "adapter", "adapter_files", "reach", "atomic", "finite")
ABOVE_CORE = ("integrations", "engine", "data", "studies", "tools", "nlp")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Every module ``name`` imports (anywhere in its code), as absolute names; package submodules resolved."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return found


def _core_modules() -> list[str]:
    return sorted(m for m in MODULES if m.split(".")[1:2] and m.split(".")[1] in CORE)


@pytest.mark.parametrize("module", _core_modules())
def test_the_core_imports_no_integration_library_and_nothing_above_it(module):
    seen, todo = set(), [module]
    while todo:  # everything the module pulls in inside the package, transitively
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        imported = _imports(current)
        libraries = {m.split(".")[0] for m in imported} & {"timm", "transformers", "peft"}
        assert not libraries, f"{current} (pulled in by {module}) imports {libraries}"
        above = {m for m in imported if m.split(".")[:2][-1] in ABOVE_CORE and m.startswith("neat_vision.")}
        assert not above, f"{current} (pulled in by {module}) imports {above}"
        todo.extend(m for m in imported if m in MODULES and m != "neat_vision")


def test_no_import_cycle_inside_the_package():
    graph = {m: {i for i in _imports(m) if i in MODULES and i != "neat_vision"} for m in MODULES}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    # a package's __init__ re-exporting its submodules is not a cycle when no submodule imports the package back
    cycles = [c for c in cycles if not all(m.startswith(c[0] + ".") or m == c[0] for m in c)]
    assert not cycles, f"import cycles: {cycles}"


def test_old_module_paths_import_with_a_deprecation_warning():
    import importlib
    import sys

    import neat_vision
    from neat_vision._moved import MOVED

    for old, new in MOVED.items():
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=f"{old} is deprecated: its contents live in {new}"):
            module = importlib.import_module(old)
        assert module is importlib.import_module(new)
    from neat_vision.config import NeatConfig  # the alias serves names as the old module did

    assert NeatConfig is neat_vision.NeatConfig


def test_an_old_module_path_still_runs_with_python_m():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-W", "always::DeprecationWarning", "-m", "neat_vision.export", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--adapter" in done.stdout
    assert "neat_vision.export is deprecated: its contents live in neat_vision.tools.export" in done.stderr
