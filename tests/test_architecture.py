"""The shape of the package: layers, names, imports, interrupts and function length.

These tests read the source (``ast``), so a change that breaks the architecture fails here
with the file and line to fix.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import hesse

ROOT = Path(hesse.__file__).parent
LAYERS = ["operators", "linalg", "analysis", "apply", "report"]  # each may import only those before it
MAX_FUNCTION_LINES = 60


def _sources() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def _layer(path: Path) -> int | None:
    parts = path.relative_to(ROOT).parts
    if parts[0] in LAYERS:
        return LAYERS.index(parts[0])
    return len(LAYERS) if parts[0] in ("cli.py", "__main__.py", "commands") else None


def _imported_hesse_packages(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hesse."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("hesse."))
    return names


def test_each_layer_imports_only_the_layers_before_it():
    offenders = []
    for path in _sources():
        layer = _layer(path)
        if layer is None:
            continue
        for package in _imported_hesse_packages(ast.parse(path.read_text())):
            other = LAYERS.index(package) if package in LAYERS else (len(LAYERS) if package in ("cli", "commands") else None)
            if other is not None and other > layer:
                offenders.append(f"{path.relative_to(ROOT)} imports hesse.{package}")
    assert not offenders, offenders


def test_no_module_is_hidden_behind_a_same_named_attribute():
    packages = ["hesse"] + [f"hesse.{m.name}" for m in pkgutil.iter_modules([str(ROOT)]) if m.ispkg]
    hidden = []
    for name in packages:
        package = importlib.import_module(name)
        for public in getattr(package, "__all__", []):
            getattr(package, public)  # load lazily exported names before looking for shadows
        for module in pkgutil.iter_modules(package.__path__):
            attribute = getattr(package, module.name, None)
            if attribute is not None and not isinstance(attribute, type(sys)):
                hidden.append(f"{name}.{module.name} is a {type(attribute).__name__}")
    assert not hidden, hidden


def test_import_hesse_pulls_in_no_plotting_cli_or_sklearn():
    code = ("import sys, hesse; [getattr(hesse, n) for n in hesse.__all__]; "
            "print(','.join(m for m in ('matplotlib', 'click', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _function_lengths(tree: ast.AST, lines: list[str]):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            reason = any("# long:" in lines[i - 1] for i in range(max(1, start - 1), node.lineno + 1))
            body = node.body
            docstring = body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str)
            doc_lines = body[0].end_lineno - body[0].lineno + 1 if docstring else 0
            yield node, node.end_lineno - node.lineno + 1 - doc_lines, reason


def test_functions_are_short_or_say_why():
    long = []
    for path in _sources():
        text = path.read_text()
        for node, length, reason in _function_lengths(ast.parse(text), text.splitlines()):
            if length > MAX_FUNCTION_LINES and not reason:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "functions over 60 lines (docstrings not counted) without a '# long: <reason>' comment: " + "; ".join(long)


def _catches_interrupt(handler: ast.ExceptHandler) -> bool:
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(k, ast.Name) and k.id in ("KeyboardInterrupt", "BaseException") for k in kinds) \
        or handler.type is None


def test_interrupts_are_re_raised_or_returned_on_request():
    """Library code handles Ctrl-C only through ``hesse.errors.interrupted`` (or re-raises it)."""
    offenders = []
    for path in _sources():
        if path.name in ("cli.py", "__main__.py"):  # the command line is where an interrupt finally ends
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler) and _catches_interrupt(node):
                body = list(ast.walk(ast.Module(body=node.body, type_ignores=[])))
                raises = any(isinstance(n, ast.Raise) for n in body)
                protocol = any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "interrupted" for n in body)
                if not (raises or protocol):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


@pytest.mark.parametrize("name", ["HesseError", "Objective", "Hessian", "GGN", "Fisher", "eigenvalues", "trace"])
def test_public_api_is_exported_once_at_the_top(name):
    assert name in hesse.__all__ and getattr(hesse, name) is not None
