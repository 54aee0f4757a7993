"""The repository itself: committed files carry no path of the machine that made them, and the packages import
only downwards (ptqkit/__init__.py names the layers); no import hides inside a function but a heavy optional one."""
import ast
import os
import re
import subprocess

import pytest

from conftest import REPO

# module (or package prefix) -> layer; a module may import its own layer and the ones below
LAYERS = [
    ["ptqkit.errors", "ptqkit.assets", "ptqkit.fetch", "ptqkit.schema", "ptqkit.cache", "ptqkit.distributed",
     "ptqkit.files", "ptqkit.precision"],
    ["ptqkit.quant"],
    ["ptqkit.models", "ptqkit.data"],
    ["ptqkit.algorithms.engine", "ptqkit.algorithms.units", "ptqkit.algorithms.graph", "ptqkit.algorithms.heap",
     "ptqkit.algorithms.progress", "ptqkit.algorithms.registry", "ptqkit.algorithms.base",
     "ptqkit.algorithms.reconstruction", "ptqkit.algorithms.bns", "ptqkit.algorithms.prepass"],
    ["ptqkit.algorithms"],
    ["ptqkit.mqbench_config", "ptqkit.config", "ptqkit.pipeline", "ptqkit.saving", "ptqkit.from_mqbench"],
    ["ptqkit.tools", "ptqkit.cli", "ptqkit.__main__", "ptq_main"],
]
FOLDERS = {"ptqkit": "ptqkit", "algorithms": "ptqkit.algorithms", "data": "ptqkit.data", "models": "ptqkit.models",
           "tools": "ptqkit.tools"}
HEAVY_OPTIONAL = {"matplotlib", "matplotlib.pyplot", "onnx", "onnxruntime"}


def tracked(*patterns) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return out.stdout.split()


def test_committed_files_carry_no_machine_path():
    pattern = re.compile(r"(?<![\w.])/(work|tmp|root|home)/[\w.-]+/")
    offenders = []
    for path in tracked():
        try:
            text = open(os.path.join(REPO, path), encoding="utf-8").read()
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue
        for match in pattern.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            offenders.append(f"{path}:{line}: {match.group(0)}")
    assert not offenders, "\n".join(offenders[:20])


def module_name(path: str) -> str | None:
    if path == "ptq_main.py":
        return "ptq_main"
    top, *rest = path[:-3].split("/")
    if top not in FOLDERS:
        return None
    parts = [FOLDERS[top]] + [p for p in rest if p != "__init__"]
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    best = None
    for i, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                if best is None or len(name) > best[1]:
                    best = (i, len(name))
    return None if best is None else best[0]


def imports(tree: ast.AST, modules: set[str]):
    """(imported ptqkit module, line) for every import: `from ptqkit.x import y` is ptqkit.x.y when that is a
    module of its own, else ptqkit.x."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                yield (full if full in modules else node.module), node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno


def test_layers_only_import_downwards_and_imports_sit_at_the_top():
    problems = []
    paths = {path: module_name(path) for path in tracked("*.py")}
    modules = {m for m in paths.values() if m}
    for path, module in paths.items():
        if module is None:
            continue
        tree = ast.parse(open(os.path.join(REPO, path)).read())
        own = layer_of(module)
        for target, line in imports(tree, modules):
            if not (target == "ptqkit" or target.startswith("ptqkit.")) or target == "ptqkit":
                continue
            theirs = layer_of(target)
            if own is not None and theirs is not None and theirs > own:
                problems.append(f"{path}:{line}: {module} (layer {own}) imports {target} (layer {theirs})")
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                    if not set(names) <= HEAVY_OPTIONAL:
                        problems.append(f"{path}:{node.lineno}: import of {', '.join(map(str, names))} inside "
                                        f"{func.name}()")
    assert not problems, "\n".join(problems)
