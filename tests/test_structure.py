"""The package's shape, read from its source: no import circle, no private name used across modules, short functions."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "mobilenet_jax")


def _modules() -> dict[str, ast.Module]:
    trees = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                module = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".").removesuffix(".__init__")
                trees[module] = ast.parse(open(path).read(), path)
    return trees


def _imported(module: str, node: ast.ImportFrom | ast.Import, trees: dict) -> list[tuple[str, list[str]]]:
    """``[(package module, [names imported from it])]`` of one import statement."""
    if isinstance(node, ast.Import):
        return [(alias.name, []) for alias in node.names if alias.name in trees]
    base = node.module or ""
    if node.level:  # relative imports
        base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
    result = []
    for alias in node.names:
        if f"{base}.{alias.name}" in trees:
            result.append((f"{base}.{alias.name}", []))
        elif base in trees:
            result.append((base, [alias.name]))
    return result


def test_no_import_circle():
    """Counting the imports inside functions too: two modules that need each other are one job cut in two."""
    trees = _modules()
    graph = {
        module: {target for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                 for target, _ in _imported(module, node, trees) if target != module}
        for module, tree in trees.items()
    }  # fmt: skip

    def reaches(start: str, goal: str, seen: set) -> bool:
        for nxt in graph[start]:
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    # A package's __init__ importing its own modules is how packages work; any other circle is not.
    circles = [m for m in graph if m not in ("mobilenet_jax", "mobilenet_jax.models") and reaches(m, m, set())]
    assert circles == []


def test_no_private_name_is_used_from_another_module():
    trees = _modules()
    crossing = []
    for module, tree in trees.items():
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, names in _imported(module, node, trees):
                    crossing += [f"{module} imports {target}.{n}" for n in names if n.startswith("_")]
                    for alias in node.names:
                        aliases[alias.asname or alias.name.split(".")[-1]] = target
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_"):
                if node.value.id in aliases and not node.attr.startswith("__"):
                    crossing.append(f"{module} uses {aliases[node.value.id]}.{node.attr}")
    assert crossing == []


def test_no_function_is_over_60_lines():
    long = [
        f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for module, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert long == []


def test_the_mobilenet_jax_command_runs_each_module_as_python_m_does():
    import shutil
    import subprocess
    import sys

    flags = ["--model", "MobileNetV1", "--width", "0.25", "--image_size", "32"]
    direct = subprocess.run([sys.executable, "-m", "mobilenet_jax.summary", *flags], capture_output=True, text=True)
    assert direct.returncode == 0 and "MobileNetV1 0.25-32" in direct.stdout, direct.stderr[-2000:]
    script = shutil.which("mobilenet-jax", path=os.path.dirname(sys.executable))  # installed by pip install -e
    launcher = [script] if script else [sys.executable, "-m", "mobilenet_jax"]
    through = subprocess.run([*launcher, "summary", *flags], capture_output=True, text=True, cwd=REPO)
    assert through.returncode == 0 and through.stdout == direct.stdout, through.stderr[-2000:]
    bad = subprocess.run([*launcher, "trian"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: usage: mobilenet-jax {train|evaluate|export|")
