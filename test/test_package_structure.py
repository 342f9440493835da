"""Package structure: ``effvla_ros.core`` imports without ROS 2, and ``effvla_ros`` has no import cycle.

Both checks discover the modules themselves (``pkgutil`` / the files under ``effvla_ros/``), so that modules
added later are covered without editing this file.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "effvla_ros"

# the ROS 2 Python packages the nodes use: none may be imported by the core
ROS_MODULES = ("rclpy", "rcl_interfaces", "builtin_interfaces", "std_msgs", "sensor_msgs", "trajectory_msgs",
               "diagnostic_msgs", "geometry_msgs", "launch", "launch_ros", "rosidl_runtime_py", "effvla_ros.msg",
               "effvla_ros.nodes")

# Runs in a fresh interpreter: a meta path finder refuses (and records) every import of ROS_MODULES before
# anything else is imported, then every module of effvla_ros.core is imported.
_NO_ROS_IMPORT = textwrap.dedent("""
    import importlib, json, pkgutil, sys, traceback
    from importlib.abc import MetaPathFinder

    BLOCKED = tuple(json.loads(sys.argv[1]))
    attempts = []

    def blocked(name):
        return any(name == b or name.startswith(b + ".") for b in BLOCKED)

    class NoRos(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if blocked(name):
                frame = sys._getframe(1)
                while frame is not None and frame.f_globals.get("__name__", "").startswith("importlib"):
                    frame = frame.f_back
                attempts.append([name, frame.f_globals.get("__name__", "?") if frame is not None else "?"])
                raise ModuleNotFoundError(f"{name} is blocked (no ROS 2 here)", name=name)
            return None

    sys.meta_path.insert(0, NoRos())
    for b in BLOCKED:
        sys.modules.pop(b, None)

    imported, errors, missing_optional = [], [], []

    def try_import(name):
        try:
            importlib.import_module(name)
            imported.append(name)
        except ModuleNotFoundError as e:
            # an optional third-party dependency absent from this environment (not ROS, not ours): reported
            if e.name and not blocked(e.name) and not e.name.startswith("effvla_ros"):
                missing_optional.append([name, e.name])
            else:
                errors.append([name, traceback.format_exc()])
        except Exception:
            errors.append([name, traceback.format_exc()])

    try_import("effvla_ros.core")
    core = sys.modules.get("effvla_ros.core")
    if core is not None:
        def onerror(name):
            errors.append([name, traceback.format_exc()])
        for info in pkgutil.walk_packages(core.__path__, "effvla_ros.core.", onerror=onerror):
            try_import(info.name)
    loaded = sorted(m for m in sys.modules if blocked(m) and sys.modules[m] is not None)
    print("@@" + json.dumps({"imported": imported, "errors": errors, "attempts": attempts,
                             "missing_optional": missing_optional, "ros_loaded": loaded}))
""")


def test_core_imports_without_ros() -> None:
    proc = subprocess.run([sys.executable, "-c", _NO_ROS_IMPORT, json.dumps(ROS_MODULES)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")]
    assert line, proc.stdout + proc.stderr
    res = json.loads(line[-1][2:])
    assert not res["errors"], "\n".join(f"{name}:\n{tb}" for name, tb in res["errors"])
    assert not res["attempts"], f"ROS imported by the core ([module, importer]): {res['attempts']}"
    assert not res["ros_loaded"], res["ros_loaded"]
    if res["missing_optional"]:
        print(f"not checked (optional dependency absent): {res['missing_optional']}")
    # discovery found the package and its subpackages (a broken walk would pass vacuously)
    imported = set(res["imported"])
    expected = {p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
                for p in (PACKAGE / "core").rglob("*.py") if p.name != "__init__.py"}
    expected |= {p.parent.relative_to(ROOT).as_posix().replace("/", ".")
                 for p in (PACKAGE / "core").rglob("__init__.py")}
    skipped = {name for name, _ in res["missing_optional"]}
    assert "effvla_ros.core" in imported and "effvla_ros.core.params" in imported
    assert expected - skipped <= imported, sorted(expected - skipped - imported)


# ------------------------------------------------------------------------------------------- import graph
def _module_names() -> dict[str, Path]:
    """Dotted module name -> file of every module under effvla_ros/ (packages named by their __init__.py)."""
    out: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that ``import name`` loads last: ``name`` itself or its longest known prefix."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        cand = ".".join(parts[:k])
        if cand in modules:
            return cand
    return None


def module_imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The effvla_ros modules ``module`` imports anywhere in its file (module level, in functions, in classes),
    relative imports resolved; ``from pkg import name`` counts as an import of ``pkg.name`` when that is a
    module, else of ``pkg``. The parent packages that Python initializes on the way are not counted (a package
    whose ``__init__`` re-exports its submodules would be a cycle with each of them)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, modules)
                if target is not None:
                    out.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                target = _resolve(f"{base}.{alias.name}", modules) if alias.name != "*" else None
                if target != f"{base}.{alias.name}":
                    target = _resolve(base, modules)
                if target is not None:
                    out.add(target)
    out.discard(module)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _module_names()
    return {m: module_imports(m, p, modules) for m, p in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # recursion depth is bounded by the number of modules
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sccs


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle (a path a -> ... -> a) per strongly connected component of more than one module."""
    cycles = []
    for comp in strongly_connected(graph):  # a shortest cycle through the component's first module (breadth first within it)
        members, start = set(comp), comp[0]
        prev: dict[str, str] = {}
        frontier: list[str] = [start]
        found: str | None = None  # the last module before start again
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        found = v
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        back: list[str] = []
        node = found
        while node is not None and node != start:
            back.append(node)
            node = prev.get(node)
        cycles.append([start, *reversed(back), start])
    return cycles


def test_cycle_finder_finds_a_cycle_and_resolves_relative_imports(tmp_path: Path) -> None:
    """The checker itself: a known cycle is reported, an acyclic graph is not, relative imports resolve."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    src = tmp_path / "mod.py"
    src.write_text("from . import sibling\nfrom .sub import thing\nfrom .. import top\n\n"
                   "def f():\n    from effvla_ros.pkg.sub import other\n")
    modules = {m: src for m in ("effvla_ros", "effvla_ros.pkg", "effvla_ros.pkg.mod", "effvla_ros.pkg.sibling",
                                "effvla_ros.pkg.sub", "effvla_ros.pkg.sub.other")}
    assert module_imports("effvla_ros.pkg.mod", src, modules) == {
        "effvla_ros.pkg.sibling", "effvla_ros.pkg.sub", "effvla_ros", "effvla_ros.pkg.sub.other"}


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert "effvla_ros.train.trainer" in graph and graph["effvla_ros.train.trainer"]  # the walk found the modules
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(
        f"{' -> '.join(c)}  (component: {', '.join(comp)})" for c, comp in zip(cycles, strongly_connected(graph)))
