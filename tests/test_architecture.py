"""What may depend on what inside tfpar, and what the compatibility registry promises.

- The launcher, cluster discovery, the planner and the manifest writer start
  without TensorFlow (a fresh interpreter shows which frameworks got loaded).
- No module-level import cycle inside tfpar; the library never imports the CLI.
- Every patch of `tfpar.compat` names its kind and upstream reason, finds the
  Keras internals it replaces, and a mechanism stays installed on a Keras
  outside its verified range while a fix is skipped.
"""

import ast
import logging
import sys
import importlib
from pathlib import Path

import pytest

from conftest import REPO, _starts_python_or_tfpar, run

PACKAGE = REPO / "tfpar"

PURE_MODULES = [
    "tfpar.plan", "tfpar.launch", "tfpar.k8s", "tfpar.cluster", "tfpar.parallel_dims",
    "tfpar.exit_codes", "tfpar.models.shapes", "tfpar.strategies.pipeline.schedules",
    "tfpar.strategies.pipeline.balance",
    # The CLI parses and checks every command's flags before TensorFlow starts.
    "tfpar.cli.main", "tfpar.train.config", "tfpar.train.sample",
]
FRAMEWORKS = ("tensorflow", "keras", "jax", "torch")


# ------------------------------------------------------- no TensorFlow on import
@pytest.mark.multiprocess
@pytest.mark.parametrize("module", PURE_MODULES)
def test_a_pure_module_imports_no_ml_framework_in_a_fresh_interpreter(module):
    result = run([sys.executable, "-c",
                  f"import sys, {module}; print(sorted(m for m in sys.modules "
                  f"if m.split('.')[0] in {FRAMEWORKS!r}))"], timeout=60, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


@pytest.mark.multiprocess
def test_the_cluster_tools_import_without_tensorflow_by_importtime():
    result = run([sys.executable, "-X", "importtime", "-c",
                  "import tfpar.plan, tfpar.launch, tfpar.k8s, tfpar.cluster"],
                 timeout=60, check=True)
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stdout.splitlines()
                if line.startswith("import time:")]
    assert "tfpar.launch.launcher" in imported  # the report is the one expected
    assert [m for m in imported if "tensorflow" in m] == []


# ------------------------------------------------------------- the import graph
def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()  # a package's __init__ is the package module
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, module_level_only: bool):
    """The import statements of a file: those run when it is imported, or all of them."""
    stack = list(ast.parse(path.read_text(), str(path)).body)
    while stack:
        node = stack.pop()
        if module_level_only:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue  # runs when called, not when imported
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                stack.extend(node.orelse)
                continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        else:
            stack.extend(ast.iter_child_nodes(node))


def imported_names(module: str, node) -> list[str]:
    """Fully qualified names an import statement in `module` loads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if MODULES[module].name == "__init__.py" \
            else module.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([node.module] if node.module else []))
    # `from tfpar.x import y` loads the submodule tfpar.x.y when there is one.
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """tfpar module -> the tfpar modules it imports at module level."""
    graph = {}
    for module, path in MODULES.items():
        targets = {name for node in imports(path, module_level_only=True)
                   for name in imported_names(module, node)}
        graph[module] = {t for t in targets if t in MODULES and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search)."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_reports_the_cycle_it_finds():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_sees_the_imports_it_should():
    graph = import_graph()
    assert "tfpar.cluster" in graph["tfpar.launch.launcher"]          # from tfpar.cluster import
    assert "tfpar.exit_codes" in graph["tfpar.k8s.manifests"]         # from tfpar import exit_codes
    assert "tfpar.compat.patch" in graph["tfpar.compat"]              # package __init__
    assert "tfpar.compat.symbolic_build" in graph["tfpar.compat"]     # from tfpar.compat import mod
    assert "tfpar.launch" in MODULES and "tfpar.launch.__init__" not in MODULES


def test_no_module_level_import_cycle_inside_tfpar():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_library_never_imports_the_cli():
    offenders = []
    for module, path in MODULES.items():
        if module == "tfpar.cli" or module.startswith("tfpar.cli."):
            continue
        for node in imports(path, module_level_only=False):  # lazy imports count too
            names = imported_names(module, node)
            if any(n == "tfpar.cli" or n.startswith("tfpar.cli.") for n in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
        for node in ast.walk(ast.parse(path.read_text())):  # importlib.import_module("tfpar.cli")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    node.value.startswith("tfpar.cli"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert offenders == []


# -------------------------------------------------------- the compat registry
def resolve(path: str):
    """'module:Attr.attr' -> the object there now."""
    module, _, attribute = path.partition(":")
    target = importlib.import_module(module)
    for part in attribute.split(".") if attribute else ():
        target = getattr(target, part)
    return target


def test_every_patch_has_a_kind_an_upstream_reason_and_finds_what_it_replaces():
    from tfpar import compat

    # Every module of tfpar/compat that defines a patch is in the registry, once.
    modules = [importlib.import_module(f"tfpar.compat.{path.stem}")
               for path in Path(compat.__file__).parent.glob("*.py") if path.stem != "__init__"]
    defined = [m.PATCH for m in modules if hasattr(m, "PATCH")]
    assert sorted(p.name for p in defined) == sorted(compat.PATCHES)
    for name, patch in compat.PATCHES.items():
        assert patch.name == name
        assert patch.kind in ("fix", "mechanism"), name
        assert patch.upstream.strip(), name
        assert patch.requires, name
        patch.check()  # CompatError if the installed Keras lacks an internal it replaces
    kinds = {p.kind for p in compat.PATCHES.values()}
    assert kinds == {"fix", "mechanism"}


@pytest.fixture
def upstream_keras():
    """Every patch removed; afterwards the registry is back to all installed."""
    from tfpar import compat

    compat.remove_keras_fixes()
    yield {path: resolve(path) for p in compat.PATCHES.values() for path in p.requires}
    compat.remove_keras_fixes()
    compat.apply_keras_fixes()


def installed(patch, upstream) -> bool:
    """Whether `patch` replaced the Keras internals it names."""
    return any(resolve(path) is not upstream[path] for path in patch.requires)


def test_inside_the_verified_range_every_patch_is_installed(upstream_keras):
    from tfpar import compat

    compat.apply_keras_fixes()
    assert {n for n, p in compat.PATCHES.items() if installed(p, upstream_keras)} == \
        set(compat.PATCHES)


def test_on_a_newer_keras_mechanisms_are_still_installed_and_fixes_are_skipped(
        upstream_keras, monkeypatch, caplog):
    from tfpar import compat

    newer = (3, 99)
    assert not any(p.verified_for(newer) for p in compat.PATCHES.values())
    monkeypatch.setattr(compat, "keras_version", lambda: newer)  # the name apply_keras_fixes uses
    monkeypatch.setattr(compat, "_warned", set())
    # An in-process CLI test may have given the logger its own handler (tfpar.cli.logs).
    monkeypatch.setattr(logging.getLogger("tfpar"), "propagate", True)
    compat.apply_keras_fixes()
    by_kind = {kind: {n for n, p in compat.PATCHES.items() if p.kind == kind}
               for kind in ("fix", "mechanism")}
    now = {n for n, p in compat.PATCHES.items() if installed(p, upstream_keras)}
    assert now == by_kind["mechanism"] == {"dtensor_variables", "dtensor_layer_inputs",
                                            "gather_on_read", "step_functions"}
    assert not compat.keras_needs_fixes()
    for name in by_kind["fix"]:
        assert f"the Keras fix {name!r}" in caplog.text and "is not applied" in caplog.text


# -------------------------------------------------- the conftest process guard
@pytest.mark.parametrize("args, kwargs, refused", [
    ([sys.executable, "-c", "pass"], {}, True),
    (["python3", "-m", "tfpar.cli.main", "info"], {}, True),
    (["/usr/local/bin/tfpar", "launch"], {}, True),
    (["env", "A=1", "python", "x.py"], {}, True),
    ("cd /tmp && tfpar plan --help", {"shell": True}, True),
    (["ip", "netns", "list"], {}, False),
    (["git", "status"], {}, False),
    ("echo hi | cat", {"shell": True}, False),
])
def test_the_process_guard_refuses_python_and_tfpar_only(args, kwargs, refused):
    assert _starts_python_or_tfpar(args, kwargs.get("executable"),
                                   kwargs.get("shell", False)) is refused
