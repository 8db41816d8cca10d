"""The package's import structure: no cycles, no private names across modules.

Pure `ast`: every module of `keras_gemma` is parsed, never imported, so this
runs the same (and in milliseconds) on every backend. All imports count,
function-local ones included: an import inside a function only defers a
cycle to the first call.

The module graph follows Python's import semantics:

- `import a.b.c` and `from a.b.c import x` import the module `a.b.c`;
  `from a.b import c` imports the submodule `a.b.c` when there is one, else
  the name `c` from (the `__init__` of) `a.b`.
- Importing `a.b.c` first runs the `__init__` of every package above it,
  except those the importer itself is inside (they are already being
  imported). So a package `__init__` importing its own submodules is not a
  cycle with them, unless a submodule imports the package back for a name
  defined in its `__init__`.

Private names: a `_name` (not a dunder) may be imported only by its own
module; a private module (`a._b`, `a._b.c`) only by modules inside its
package (`a` and below).
"""

import ast
import pathlib
import sys

PACKAGE = "keras_gemma"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE


def is_private(name):
    return name.startswith("_") and not name.startswith("__")


def is_inside(module, package):
    """Whether `module` is `package` or a module below it."""
    return module == package or module.startswith(package + ".")


def module_names(root=ROOT):
    """`{dotted module name: path}` of every `.py` file of the package."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def is_package(path):
    return path.name == "__init__.py"


class Import:
    """One imported module or name, where it is imported."""

    def __init__(self, importer, where, node, module, name=None):
        self.importer = importer  # the importing module
        self.module = module  # the module imported, or imported from
        self.name = name  # the name imported from `module`, if not a submodule
        self.where = f"{where}:{node.lineno}"
        self.statement = ast.unparse(node)

    def __str__(self):
        return f"{self.where}: {self.statement}"


def _absolute(module, path, node):
    """The absolute module name a (possibly relative) `ImportFrom` names."""
    if not node.level:
        return node.module
    package = module if is_package(path) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports(modules, root=ROOT):
    """Every import statement's targets, as `Import`s, in every module."""
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = path.relative_to(root.parent).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found.append(Import(module, where, node, alias.name))
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, path, node)
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    if submodule in modules:
                        found.append(Import(module, where, node, submodule))
                    else:
                        found.append(Import(module, where, node, base, alias.name))
    return found


def import_graph(modules, found):
    """`{importer: {imported: [Import, ...]}}` over the package's modules."""
    graph = {module: {} for module in modules}
    for item in found:
        if not is_inside(item.module, PACKAGE):
            continue
        # The module itself and every package above it that the importer is
        # not inside: Python runs their `__init__`s first.
        parts = item.module.split(".")
        targets = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for target in targets:
            if target == item.importer:
                continue
            if target != item.module and is_inside(item.importer, target):
                continue
            if target in modules:
                graph[item.importer].setdefault(target, []).append(item)
    return graph


def strongly_connected_components(graph):
    """Tarjan's algorithm; returns the components with more than one module."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for node in sorted(graph):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)
    return components


def a_cycle(graph, component):
    """One cycle through the first module of `component`, as a module list."""
    members = set(component)
    start = component[0]
    # Breadth-first from `start` back to it, inside the component.
    parents, frontier = {start: None}, [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node]):
                if successor == start:
                    path = [node]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if successor in members and successor not in parents:
                    parents[successor] = node
                    following.append(successor)
        frontier = following
    raise AssertionError(f"No cycle through {start} in {component}")


def describe_cycles(graph, components):
    lines = []
    for component in components:
        cycle = a_cycle(graph, component)
        lines.append(f"Import cycle of {len(component)} modules: {', '.join(component)}")
        lines.append("  for example " + " -> ".join(cycle) + ":")
        for importer, imported in zip(cycle, cycle[1:]):
            for item in graph[importer][imported]:
                lines.append(f"    {item}")
        lines.append("  all imports inside the cycle:")
        for importer in component:
            for imported in sorted(set(graph[importer]) & set(component)):
                for item in graph[importer][imported]:
                    lines.append(f"    {item}  ({importer} -> {imported})")
    return "\n".join(lines)


def private_crossings(modules, found):
    """Imports of another module's private name or another package's private module."""
    problems = []
    for item in found:
        if not is_inside(item.module, PACKAGE):
            continue
        if item.name is not None and is_private(item.name) and item.module != item.importer:
            problems.append(f"{item}  (private name {item.name!r} of {item.module})")
        parts = item.module.split(".")
        for i, part in enumerate(parts):
            owner = ".".join(parts[:i])
            if is_private(part) and not is_inside(item.importer, owner):
                problems.append(
                    f"{item}  (private module {'.'.join(parts[: i + 1])}, importable only "
                    f"inside {owner})"
                )
                break
    return problems


# The tests.


def test_every_module_is_parsed():
    modules = module_names()
    for expected in (PACKAGE, f"{PACKAGE}.backbone", f"{PACKAGE}.checkpoints"):
        assert expected in modules
    assert len(modules) > 10


def test_no_import_cycles():
    modules = module_names()
    graph = import_graph(modules, imports(modules))
    components = strongly_connected_components(graph)
    assert not components, "\n" + describe_cycles(graph, components)


def test_no_private_names_across_modules():
    modules = module_names()
    problems = private_crossings(modules, imports(modules))
    assert not problems, "\n" + "\n".join(problems)


def test_other_packages_internals_are_imported_only_in_internals():
    """`keras.src` and other packages' private modules or names: only in
    `keras_gemma/internals.py`, where each has a test (tests/test_internals.py)."""
    modules = module_names()
    problems = []
    for item in imports(modules):
        if is_inside(item.module, PACKAGE) or item.importer == f"{PACKAGE}.internals":
            continue
        parts = item.module.split(".")
        if parts[0] in sys.stdlib_module_names:
            continue
        names = parts + ([item.name] if item.name else [])
        if is_inside(item.module, "keras.src") or any(map(is_private, names)):
            problems.append(str(item))
    assert not problems, "\n" + "\n".join(problems)


# The checks themselves, on small made-up packages.


def _graph_of(tmp_path, files):
    root = tmp_path / PACKAGE
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    modules = module_names(root)
    found = imports(modules, root)
    return modules, found, import_graph(modules, found)


def test_function_local_imports_make_cycles(tmp_path):
    _, _, graph = _graph_of(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from keras_gemma import b\n",
            "b.py": "def f():\n    from keras_gemma.a import x\n",
        },
    )
    components = strongly_connected_components(graph)
    assert components == [["keras_gemma.a", "keras_gemma.b"]]
    assert "keras_gemma/b.py:2" in describe_cycles(graph, components)


def test_a_package_importing_its_submodules_is_no_cycle(tmp_path):
    files = {
        "__init__.py": "from keras_gemma.sub import thing\n__version__ = '1'\n",
        "sub/__init__.py": (
            "from keras_gemma.sub import _impl\nfrom keras_gemma.sub._impl import f\n"
        ),
        "sub/_impl.py": "from keras_gemma.sub import other\nimport keras_gemma.sub.other\n",
        "sub/other.py": "import os\n",
    }
    _, _, graph = _graph_of(tmp_path, files)
    assert strongly_connected_components(graph) == []
    # ... until a submodule imports a name defined in a package `__init__`.
    files["sub/other.py"] = "def f():\n    import keras_gemma\n    keras_gemma.__version__\n"
    _, _, graph = _graph_of(tmp_path, files)
    assert strongly_connected_components(graph) == [
        ["keras_gemma", "keras_gemma.sub", "keras_gemma.sub._impl", "keras_gemma.sub.other"]
    ]


def test_importing_a_submodule_runs_its_package(tmp_path):
    _, _, graph = _graph_of(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from keras_gemma.layers.x import f\n",
            "layers/__init__.py": "from keras_gemma.layers.y import g\n",
            "layers/x.py": "",
            "layers/y.py": "from keras_gemma import a\n",
        },
    )
    assert strongly_connected_components(graph) == [
        ["keras_gemma.a", "keras_gemma.layers", "keras_gemma.layers.y"]
    ]


def test_private_crossings_are_found(tmp_path):
    modules, found, _ = _graph_of(
        tmp_path,
        {
            "__init__.py": "from keras_gemma import _util\n",
            "_util.py": "_SECRET = 1\n",
            "a.py": "from keras_gemma._util import _SECRET\nfrom keras_gemma.io import __doc__\n",
            "io/__init__.py": "from keras_gemma.io._files import read\n",
            "io/_files.py": "from . import _helpers\n",
            "io/_helpers.py": "",
            "b.py": "def f():\n    from keras_gemma.io import _files\n",
        },
    )
    problems = private_crossings(modules, found)
    assert len(problems) == 2, problems
    assert "keras_gemma/a.py:1" in problems[0] and "'_SECRET'" in problems[0]
    assert "keras_gemma/b.py:2" in problems[1] and "keras_gemma.io._files" in problems[1]
