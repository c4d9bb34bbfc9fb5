"""The shape of the package: one-way dependencies, no private names across modules, thin jobs."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "segray"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every import in the file, at any depth (function-level ones too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
    return found


def edges(name: str) -> set[str]:
    """The segray modules that module ``name`` imports (a name that is a submodule counts as that module)."""
    out = set()
    for module, names, _ in imports(MODULES[name]):
        if not module.startswith("segray"):
            continue
        subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
        out.update(subs or [module])
        if subs and len(subs) < len(names):
            out.add(module)
    out.discard(name)
    return {m for m in out if m in MODULES}


def test_inference_does_not_depend_on_training():
    for name, path in MODULES.items():
        if name.startswith("segray.inference"):
            for module, _, line in imports(path):
                assert not module.startswith("segray.training"), f"{path}:{line} imports {module}"


def test_no_private_name_is_imported_across_modules():
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "jobs").glob("*.py")]:
        for module, names, line in imports(path):
            if module.startswith("segray"):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                assert not private, f"{path}:{line} imports private {private} from {module}"


def test_no_import_cycles():
    graph = {name: edges(name) for name in MODULES}
    # A package's __init__ re-exports its modules; a module importing its own
    # package's __init__ back would be a cycle, and so would any longer loop.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_jobs_are_thin_callers_of_one_helper():
    for path in (ROOT / "jobs").glob("*.py"):
        calls = [m for m, names, _ in imports(path) if m.startswith("segray")]
        assert calls == ["segray.cli"], f"{path} imports {calls}"
        assert f'job("{path.stem}")' in path.read_text()
        assert len(path.read_text().splitlines()) < 25


def test_saved_run_file_names_are_spelled_in_one_module():
    for path in PACKAGE.rglob("*.py"):
        if path.name == "saved.py":
            continue
        text = path.read_text()
        for literal in ('"preprocessing.json"', '"model.keras"', '"best.json"'):
            assert literal not in text, f"{path} spells {literal}; use segray.models.saved"


def test_model_families_are_reached_through_the_registry_only():
    """What a model can do (deep supervision, its stride, XLA) is asked of its registry entry, not of its module."""
    families = {"segray.models.unet", "segray.models.segnet", "segray.models.deeplabv3plus"}
    for name, path in MODULES.items():
        if name.startswith("segray.models"):
            continue
        for module, names, line in imports(path):
            used = {module} | {f"{module}.{n}" for n in names}
            assert not used & families, f"{path}:{line} imports {sorted(used & families)}; ask segray.models.spec(name)"
