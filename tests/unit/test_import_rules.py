"""Dependency direction (STYLE.md): service -> workers -> rcm_core, never the reverse."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
FORBIDDEN = {
    "rcm_core": {"ray", "fastapi", "service", "workers", "mlflow", "boto3"},
    "workers": {"service", "fastapi"},
    "service": {"torch", "rcm_core", "workers", "triton", "rcm_client"},
    "rcm_client": {"service", "workers", "fastapi", "ray", "torch"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_dependency_direction(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has Python files"
    bad = {str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN[package]) for f in files}
    assert not {k: v for k, v in bad.items() if v}


def test_triton_only_in_kernels():
    for f in (ROOT / "rcm_core").rglob("*.py"):
        if "kernels" not in f.parts:
            assert "triton" not in _imports(f), f
