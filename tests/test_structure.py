"""The package's shape: subpackages in one order of floors, cli > train > eval > weights >
{data, model} > the root modules, where each module imports only its own floor and those below
(data and model not each other), and no import cycle among the modules, counting imports inside
functions (an import moved into a function to dodge a cycle is still a cycle)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "solarjax"
FLOOR = {"root": 0, "model": 1, "data": 1, "weights": 2, "eval": 3, "train": 4, "cli": 5}
# `python -m solarjax.sample` / `solarjax.evaluate`: entry points at the top, like train.py.
ENTRY_POINTS = {"solarjax.sample", "solarjax.evaluate"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the solarjax modules it imports (a `from package import name` that is a module counts as it)."""
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("solarjax"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("solarjax.")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in FLOOR) else "root"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path of module names, or None (depth-first search with colors)."""
    state, path = {}, []

    def visit(v):
        state[v] = "open"
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = "done"
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_subpackages_are_there():
    groups = {_group(m) for m in _modules()}
    assert groups == set(FLOOR), groups
    assert _group("solarjax.train.trainer") == "train" and _group("solarjax.files") == "root"
    assert _group("solarjax.data") == "data" and _group("solarjax") == "root"


def test_no_import_cycle_among_the_modules():
    graph = _imports(_modules())
    assert {"solarjax.train.config", "solarjax.model.config", "solarjax.train.trainer", "solarjax.data.pipeline",
            "solarjax.data.records"} <= set(graph)  # the scan sees the package
    assert "solarjax.train.objectives" in graph["solarjax.train.config"]  # and imports, top-level or not
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_each_module_imports_only_its_floor_and_below():
    graph = _imports(_modules())
    wrong = []
    for module, deps in graph.items():
        if module in ENTRY_POINTS or module == "solarjax":  # the package's public face imports its floors
            continue
        mine = _group(module)
        for dep in deps:
            theirs = _group(dep)
            if FLOOR[theirs] > FLOOR[mine] or (theirs != mine and FLOOR[theirs] == FLOOR[mine]):
                wrong.append(f"{module} ({mine}) imports {dep} ({theirs})")
    assert not wrong, "\n".join(sorted(wrong))
