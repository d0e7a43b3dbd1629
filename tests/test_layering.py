"""Package layering and import cycles, read from the source with ``ast`` (every import, also those inside
functions, and ``importlib.import_module`` with a literal name).

Layers, lowest first: utils < symbols < eval < recognition < tools. A module may import its own package and the
packages below it, never one above (utils imports nothing of the project's). The import graph between the
modules of recognition/, eval/, symbols/ and utils/ has no cycle, except those listed in KNOWN_CYCLES.
"""
import ast
import functools
import os

import pytest

from tests.harness import ROOT

LAYERS = ("utils", "symbols", "eval", "recognition", "tools")
CHECKED = ("utils", "symbols", "eval", "recognition")     # tools/ is the top: it may import anything below

# Import cycles that exist today and are being removed (each is a set of modules that import one another,
# directly or through each other). Do not add to this list: fix the new cycle. When a cycle is gone, its
# expected failure below turns into an unexpected pass, and the entry must be deleted.
KNOWN_CYCLES = []


def module_name(path):
    """'recognition/partial_fc/head.py' -> 'recognition.partial_fc.head' (a package's __init__: the package)."""
    parts = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules():
    """{module name: path} of every .py file under the CHECKED packages."""
    found = {}
    for package in CHECKED:
        for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    found[module_name(path)] = path
    return found


def known_module(name, modules):
    """True when ``name`` is one of the project's modules (those parsed, or one of tools/)."""
    return name in modules or name.split(".")[0] == "tools"


def imported_names(path, module, is_package):
    """[(line, imported module name)] of every import in ``path`` (module ``module``): for ``from X import y``
    both X and X.y are given (the caller keeps X.y when it is a module, else X)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found += [(node.lineno, base, alias.name) for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value, None))
    return found


@functools.lru_cache(maxsize=None)
def import_graph():
    """{module: {imported project module: first line}} over the CHECKED packages."""
    modules = source_modules()
    graph = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for line, base, name in imported_names(path, module, path.endswith("__init__.py")):
            target = base + "." + name if name and known_module(base + "." + name, modules) else base
            if target.split(".")[0] in LAYERS and target != module:
                edges.setdefault(target, line)
    return modules, graph


def strongly_connected(graph):
    """The strongly connected components of ``graph`` with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(component)
    return components


def describe(component, graph):
    """'a -> b (line 3), b -> a (line 9)': the imports inside one cycle, for the failure message."""
    return ", ".join("%s -> %s (line %d)" % (a, b, graph[a][b])
                     for a in sorted(component) for b in sorted(graph[a]) if b in component)


def test_the_parser_sees_every_kind_of_import(tmp_path):
    """The graph builder on a hand-written module: top-level, lazy, relative and importlib imports."""
    path = tmp_path / "mod.py"
    path.write_text("import os\nimport recognition.dist\nfrom eval import verification\n"
                    "def f():\n    from .sibling import thing\n    import importlib\n"
                    "    importlib.import_module('recognition.configs.base')\n")
    names = imported_names(str(path), "eval.mod", False)
    assert (2, "recognition.dist", None) in names and (3, "eval", "verification") in names
    assert (5, "eval.sibling", "thing") in names and (7, "recognition.configs.base", None) in names
    assert strongly_connected({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}) == [{"a", "b", "c"}]
    assert strongly_connected({"a": {"b": 1}, "b": {}}) == []


def test_packages_import_only_their_own_layer_and_below():
    modules, graph = import_graph()
    assert len(modules) > 40 and {"utils.fileio", "eval.embedding", "recognition.trainer"} <= set(modules)
    wrong = ["%s line %d imports %s" % (os.path.relpath(modules[source], ROOT), line, target)
             for source, edges in sorted(graph.items()) for target, line in sorted(edges.items())
             if LAYERS.index(target.split(".")[0]) > LAYERS.index(source.split(".")[0])]
    assert not wrong, "imports against the layering %s:\n%s" % (" < ".join(LAYERS), "\n".join(wrong))


def test_no_new_import_cycle():
    _, graph = import_graph()
    known = [frozenset(cycle) for cycle in KNOWN_CYCLES]
    new = [component for component in strongly_connected(graph) if frozenset(component) not in known]
    assert not new, "import cycles:\n%s" % "\n".join(describe(component, graph) for component in new)


@pytest.mark.xfail(strict=True, reason="a known import cycle, being removed; delete it from KNOWN_CYCLES once gone")
@pytest.mark.parametrize("cycle", KNOWN_CYCLES, ids=lambda cycle: "<->".join(sorted(m.split(".")[-1] for m in cycle)))
def test_known_cycle_is_gone(cycle):
    _, graph = import_graph()
    assert frozenset(cycle) not in [frozenset(component) for component in strongly_connected(graph)], \
        describe(cycle, graph)
