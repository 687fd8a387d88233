"""The project's modules import each other without a cycle, function-level imports included: the
graph is built from every module's source with `ast` (nothing is imported), so an import hidden in
a function counts as much as one at the top."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_modules() -> dict:
    """{module name: path} of the project's own code (top-level files, kernels/, study/), tests left out."""
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    for pkg in ("kernels", "study"):
        for p in (ROOT / pkg).rglob("*.py"):
            rel = p.relative_to(ROOT).with_suffix("")
            mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = p
    return mods


def imports_of(path: Path, name: str, mods: dict) -> list[tuple[str, int, bool]]:
    """(imported project module, line, at top level?) for every import statement in the file."""
    tree = ast.parse(path.read_text(), str(path))
    top = set(map(id, tree.body))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y, from . import y
                parts = package.split(".") if package else []
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" if base else a.name for a in node.names]
        else:
            continue
        found = set()
        for n in names:
            while n and n not in mods:
                n = n.rpartition(".")[0]
            if n and n != name:
                found.add(n)
        out += [(n, node.lineno, id(node) in top) for n in sorted(found)]
    return out


def find_cycle(graph: dict) -> list[str] | None:
    state, stack = {}, []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (c := visit(v)):
                return c
        stack.pop()
        state[u] = 2
        return None
    for u in sorted(graph):
        if u not in state and (c := visit(u)):
            return c
    return None


def test_no_import_cycles():
    mods = project_modules()
    assert {"federated", "protocol", "distill", "filter", "kernels", "study.compare"} <= set(mods)
    graph = {m: {n for n, _, _ in imports_of(p, m, mods)} for m, p in mods.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    """The check can fail: two files importing each other, one of them inside a function."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    mods = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    graph = {m: {n for n, _, _ in imports_of(p, m, mods)} for m, p in mods.items()}
    assert find_cycle(graph) in (["a", "b", "a"], ["b", "a", "b"])
    assert imports_of(mods["b"], "b", mods) == [("a", 2, False)]


def test_function_level_imports_of_project_modules_are_none():
    """Inside functions only optional or heavy third-party packages are imported (each with its reason
    beside it); the project's own modules are imported at the top of the file that uses them."""
    mods = project_modules()
    inner = [f"{p.relative_to(ROOT)}:{line} imports {n}" for m, p in mods.items()
             for n, line, top in imports_of(p, m, mods) if not top and not m.startswith("study")]
    assert inner == [], "\n".join(inner)
