"""The package's architecture as a checked rule (an AST walk of every import, function-level ones too):

* imports run one way between the subpackages: ``ops`` -> ``quantizers`` -> ``training`` ->
  ``layer`` -> ``distributed`` (each may import only those before it and the root helpers
  ``checks`` / ``backends``), and no module-level import cycle exists anywhere;
* the package root holds at most 6 modules beside ``__init__.py``;
* no Python file is over 500 lines;
* no module imports another module's underscore names or reads another object's underscore
  attributes (``obj._x`` with ``obj`` not ``self`` / ``cls``; torch's own ``_version``, ``_C`` and
  the like are allowed, see ``TORCH_PRIVATE``).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "torchaq"
LAYERS = ["ops", "quantizers", "training", "layer", "distributed"]
ROOT_HELPERS = {"torchaq.checks", "torchaq.backends"}
# torch internals the package reads on torch's own objects (not the project's)
TORCH_PRIVATE = {"_version", "_C", "_check", "_check_value", "_check_type", "_dispatch_get_all_op_names", "_parameters", "_buffers", "_modules",
                 "_apply", "_load_from_state_dict", "_get_pg_default_device", "_assert_async"}


def modules() -> dict:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        parts = ["torchaq", *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    for path in (ROOT / "triton_kernels").glob("*.py"):
        name = "torchaq.triton_kernels" + ("" if path.stem == "__init__" else "." + path.stem)
        out[name] = path
    return out


def imports(name: str, path: Path) -> list:
    """``(target module, imported names)`` of every import in the file, absolute."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [a.name for a in node.names]))
    return found


def resolve(target: str, names: list, mods: dict) -> set:
    """The package modules an import reaches (``from pkg import mod`` reaches ``pkg.mod``)."""
    reached = set()
    for t in [target] + [f"{target}.{n}" for n in names]:
        while t and t not in mods:
            t = t.rpartition(".")[0]
        if t and t != "torchaq":
            reached.add(t)
    return reached


def layer_of(mod: str):
    parts = mod.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_subpackages_import_one_way_and_no_cycle():
    mods = modules()
    graph = {m: set() for m in mods}
    wrong = []
    for m, path in mods.items():
        for target, names in imports(m, path):
            for t in resolve(target, names, mods):
                if t == m or m.startswith(t + "."):
                    continue
                graph[m].add(t)
                lm, lt = layer_of(m), layer_of(t)
                if lt is not None and (lm is None and m in ROOT_HELPERS or lm is not None and lt > lm):
                    wrong.append(f"{m} imports {t}")
    assert not wrong, "imports against the layer order ops -> quantizers -> training -> layer -> distributed:\n" + "\n".join(wrong)
    # cycles: depth-first search over the whole graph (function-level imports included)
    state, stack, cycles = {}, [], []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in graph[v]:
            if state.get(w) == 1:
                cycles.append(stack[stack.index(w):] + [w])
            elif w not in state:
                visit(w)
        stack.pop()
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_package_root_and_file_sizes():
    root_modules = sorted(p.name for p in PKG.glob("*.py") if p.name != "__init__.py")
    assert len(root_modules) <= 6, root_modules
    subpackages = sorted(p.parent.name for p in PKG.glob("*/__init__.py"))
    assert subpackages == sorted(LAYERS), subpackages
    long = [f"{p.relative_to(ROOT)}: {n}" for p in modules().values() if (n := len(p.read_text().splitlines())) > 500]
    assert not long, long


def test_no_private_reach_ins():
    mods = modules()
    bad = []
    for m, path in mods.items():
        for target, names in imports(m, path):
            if target.startswith("torchaq") and target != m:
                bad += [f"{m} imports {target}.{n}" for n in names
                        if n.startswith("_") and not n.startswith("__") and n != "_C" and f"{target}.{n}" not in mods]
        tree = ast.parse(path.read_text())
        own = {"self", "cls", "ctx"} | {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}  # the module's own
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and node.attr not in TORCH_PRIVATE
                    and not (isinstance(node.value, ast.Name) and node.value.id in own)):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} reads {ast.unparse(node)}")
    assert not bad, "\n".join(bad)
