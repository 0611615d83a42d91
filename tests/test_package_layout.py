"""The package's shape stays what docs/architecture.md describes: subpackages by role, no import cycles
between modules, small modules and functions, and the public API in place."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "fastguide").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
MAX_MODULE_LINES = 600
MAX_FUNCTION_LOGIC_LINES = 80


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["fastguide"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, known: set) -> set:
    """Modules of the package imported at module level (``from . import x`` names the submodule x)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    deps = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            submodules = {f"{module}.{a.name}" for a in node.names} & known
            deps |= submodules or ({module} & known)
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names} & known
    deps.discard(name)
    return deps


def test_no_import_cycles_between_modules():
    known = {_module_name(p) for p in SOURCES}
    graph = {_module_name(p): _imports(p, known) for p in SOURCES}
    # A package's __init__ re-exports its modules; a module importing a sibling through the package is fine.
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif not state.get(v):
                visit(v)
        stack.pop()
        state[u] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _logic_lines(source: str, node: ast.AST) -> int:
    """Lines of a function that hold code: no blank lines, comments or docstring."""
    lines = source.splitlines()[node.lineno - 1: node.end_lineno]
    body = node.body
    skip = set()
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        skip = set(range(body[0].lineno, body[0].end_lineno + 1))
    code = set()
    for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines)).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.ENDMARKER):
            code.add(tok.start[0] + node.lineno - 1)
    return len(code - skip)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_stay_small(path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path.name} has over {MAX_MODULE_LINES} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = _logic_lines(source, node)
            assert n <= MAX_FUNCTION_LOGIC_LINES, f"{path.name}:{node.lineno} {node.name} has {n} lines of code"


def test_public_api_is_in_place():
    import fastguide
    for name in ("step", "sample", "CFG", "ClassifierGuidance", "DiscriminatorGuidance", "smooth", "guided_step",
                 "temperature_lse_grad", "per_sample_rms", "Schedule", "backends", "StepOutput", "samplers",
                 "CFGPlusPlus", "CFGZeroStar", "APG", "MamboG", "TCFG", "PerturbedGuidance", "guidance_gram"):
        assert hasattr(fastguide, name), name
    assert callable(fastguide.sample) and callable(fastguide.step)
    assert callable(fastguide.samplers.build) and callable(fastguide.dropin.prepare)


def test_python_dash_m_runs_the_cli():
    res = subprocess.run([sys.executable, "-m", "fastguide", "backends"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "torch" in res.stdout and "available" in res.stdout
