"""The shape of the package: no import loops between packages, packages used through their faces, thin jobs."""

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


def unit(module: str) -> str | None:
    """The node of the package graph that ``module`` belongs to: its sub-package, its top-level module, or ``segray``.

    ``segray.training.loop`` and ``segray.training`` are ``segray.training``;
    ``segray.config`` is itself; the root package (which imports the API) is ``segray``.
    """
    parts = module.split(".")
    if parts[0] != "segray":
        return None
    return "segray" if len(parts) == 1 else f"segray.{parts[1]}"


def unit_imports(path: Path) -> list[tuple[str, int]]:
    """(node, line) of every segray node the file imports, function-level imports included.

    ``import a.b.c`` and ``from a.b.c import d`` import ``a.b``'s node;
    ``from segray import x`` imports ``segray.x`` when it is a module or
    package, else the root ``segray``.
    """
    found = []
    for module, names, line in imports(path):
        if module == "segray" and names:
            found += [(f"segray.{n}" if f"segray.{n}" in MODULES else "segray", line) for n in names]
        elif (node := unit(module)) is not None:
            found.append((node, line))
    return found


def package_graph() -> dict[str, dict[str, list[str]]]:
    """node -> {imported node: [file:line, ...]} over every module of segray/."""
    graph: dict[str, dict[str, list[str]]] = {}
    for name, path in MODULES.items():
        source = unit(name)
        graph.setdefault(source, {})
        for target, line in unit_imports(path):
            if target != source:
                graph[source].setdefault(target, []).append(f"{path.relative_to(ROOT)}:{line}")
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of the graph as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_graph_counts_deep_and_function_level_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "import segray.training.loop\n"
        "from segray import storage, api\n"
        "def f():\n"
        "    from segray.inference.pipeline import x\n"
        "    import segray\n"
    )
    assert sorted(unit_imports(source)) == [
        ("segray", 5), ("segray.api", 2), ("segray.inference", 4), ("segray.storage", 2), ("segray.training", 1),
    ]
    loop = {"segray.a": {"segray.b": ["x"]}, "segray.b": {"segray.c": ["y"]}, "segray.c": {"segray.a": ["z"]}}
    assert find_cycle(loop) == ["segray.a", "segray.b", "segray.c", "segray.a"]
    assert find_cycle({"segray.a": {"segray.b": ["x"]}, "segray.b": {}}) is None


def test_no_package_level_import_loops():
    """Sub-packages, top-level modules and the root form a graph without loops, function-level imports included."""
    graph = package_graph()
    assert {"segray", "segray.api", "segray.config", "segray.training", "segray.inference"} <= set(graph)
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} -> {b} ({', '.join(graph[a][b])})" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("package-level import loop:\n  " + "\n  ".join(steps))


PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py" and name != "segray"}


def exported(package: str) -> set[str]:
    """The names in ``package``'s ``__all__`` (its face), read from its ``__init__`` without importing it."""
    for node in ast.parse(MODULES[package].read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def face_violations(path: Path, here: str | None) -> list[str]:
    """Imports in ``path`` (of node ``here``) of another package's names that its ``__all__`` does not export."""
    problems = []
    for module, names, line in imports(path):
        package = unit(module)
        if package not in PACKAGES or package == here:
            continue
        if not names and module != package:
            problems.append(f"{path}:{line} imports {module}; use the names {package} exports")
        hidden = sorted(n for n in names if n not in exported(package))
        if hidden:
            problems.append(f"{path}:{line} imports {hidden} from {module}; {package}.__all__ does not export them")
    return problems


def test_every_package_exports_what_its_init_defines():
    for package in PACKAGES:
        names = exported(package)
        assert names, f"{MODULES[package]} has no __all__"
        module = ast.parse(MODULES[package].read_text())
        bound = {a.asname or a.name for n in ast.walk(module) if isinstance(n, ast.ImportFrom) for a in n.names}
        bound |= {n.name for n in module.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        # Names a PEP 562 __getattr__ loads on first use sit in a module-level tuple (metrics' _TF_NAMES ...).
        lazy = {e for n in module.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Tuple) for e in ast.literal_eval(n.value)}
        assert names <= bound | lazy, f"{package}.__all__ names {sorted(names - bound - lazy)}, which its __init__ does not bind"


def test_other_packages_and_benchmarks_use_only_exported_names(tmp_path):
    example = tmp_path / "m.py"
    example.write_text("from segray.inference.pipeline import predict, not_exported\nimport segray.export.session\n")
    assert len(face_violations(example, None)) == 2 and "['not_exported']" in face_violations(example, None)[0]
    problems = [
        problem
        for path in [*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
        for problem in face_violations(path, unit(module_name(path)) if path.is_relative_to(PACKAGE) else None)
    ]
    assert not problems, "\n".join(problems)


def test_the_root_loads_its_names_from_package_faces():
    tree = ast.parse(MODULES["segray"].read_text())
    table = next(n.value for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "_PUBLIC")
    lazy = ast.literal_eval(table)
    assert "TrainResult" in lazy
    for name, module in lazy.items():
        assert module in MODULES, f"segray.{name} from {module}: no such module"
        assert module in PACKAGES or module.count(".") == 1, f"segray.{name} from {module}: load it from its package"
        assert module not in PACKAGES or name in exported(module), f"segray.{name}: {module}.__all__ does not export it"


# Ray has no public call for these two: the GPUs a local Ray would find before
# it starts, and the most an autoscaling cluster may give (Ray Train itself
# reads ray._private.state for it). They live in runtime.py alone.
PRIVATE_RAY_ALLOWED = {("segray/runtime.py", "local_gpus"), ("segray/runtime.py", "cluster_limits")}


def ray_private_uses(path: Path) -> set[tuple[str, str]]:
    """(file, innermost function or "<module>") of every ``ray._private`` import or attribute in ``path``."""
    found = set()

    def visit(node: ast.AST, where: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            where = node.name
        private = (
            (isinstance(node, ast.ImportFrom) and "_private" in (node.module or "").split("."))
            or (isinstance(node, ast.Import) and any("_private" in a.name.split(".") for a in node.names))
            or (isinstance(node, ast.Attribute) and node.attr == "_private")
        )
        if private:
            found.add((str(path.relative_to(ROOT)), where))
        for child in ast.iter_child_nodes(node):
            visit(child, where)

    visit(ast.parse(path.read_text()), "<module>")
    return found


def test_ray_private_is_used_only_where_ray_has_no_public_call():
    used = set().union(*(ray_private_uses(path) for path in PACKAGE.rglob("*.py")))
    assert used == PRIVATE_RAY_ALLOWED, f"ray._private used in {sorted(used - PRIVATE_RAY_ALLOWED)}; use Ray's public API"


def test_jobs_are_thin_callers_of_one_helper():
    for path in (ROOT / "jobs").glob("*.py"):
        calls = [m for m, names, _ in imports(path) if m.startswith("segray")]
        assert calls == ["segray.cli"], f"{path} imports {calls}"
        assert f'job("{path.stem}")' in path.read_text()
        assert len(path.read_text().splitlines()) < 25


RUN_FILE_NAMES = (
    '"config.json"', '"plan.json"', '"history.parquet"', '"ended.json"', '"preprocessing.json"', '"model.keras"', '"best.json"',
    '"weights.npz"', '"optimizer.npz"', '"state.json"', '"trials.parquet"',
)


def test_saved_run_file_names_are_spelled_in_one_module():
    layout = PACKAGE / "runs" / "layout.py"
    assert all(literal in layout.read_text() for literal in RUN_FILE_NAMES)
    for path in PACKAGE.rglob("*.py"):
        if path == layout:
            continue
        text = path.read_text()
        for literal in RUN_FILE_NAMES:
            assert literal not in text, f"{path} spells {literal}; use segray.runs"


def test_models_import_nothing_of_segray_outside_models():
    """Models build networks; runs, data, storage, config and the API sit above them (runs saves and loads models)."""
    for name, path in MODULES.items():
        if name.startswith("segray.models"):
            outside = [(m, line) for m, _, line in imports(path) if m.startswith("segray") and unit(m) != "segray.models"]
            assert not outside, f"{path} imports {outside}; segray.models imports only its own modules"


def test_model_families_are_reached_through_the_registry_only():
    """What a model can do (deep supervision, its stride, XLA) is asked of its registry entry, not of its module."""
    families = {"segray.models.unet", "segray.models.segnet", "segray.models.deeplabv3plus"}
    for name, path in MODULES.items():
        if name.startswith("segray.models"):
            continue
        for module, names, line in imports(path):
            used = {module} | {f"{module}.{n}" for n in names}
            assert not used & families, f"{path}:{line} imports {sorted(used & families)}; ask segray.models.spec(name)"
