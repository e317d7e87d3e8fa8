"""Dependency direction (STYLE.md): service -> workers -> rcm_core, never the reverse."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
FORBIDDEN = {
    "rcm_core": {"ray", "fastapi", "service", "workers", "mlflow", "boto3"},
    "workers": {"service", "fastapi"},
    # the API image installs only service/'s imports: no torch, and no diffusers / accelerate (issue 17's teachers
    # are checked from their config.json alone, service/teachers.py)
    "service": {"torch", "rcm_core", "workers", "triton", "rcm_client", "diffusers", "accelerate", "safetensors"}
    | {"peft"},
    # the client installs without the method: a job command needs httpx and yaml only
    "rcm_client": {"service", "workers", "fastapi", "ray", "torch", "rcm_core"},
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


def test_diffusers_only_in_teachers():
    # diffusers costs ~5 s of import: only the teacher families (and the worker/task code that loads them)
    # may import it, so plain rcm_core users and the toy tasks never pay for it
    allowed = {"teachers"}
    offenders = [
        str(f.relative_to(ROOT))
        for f in (ROOT / "rcm_core").rglob("*.py")
        if not allowed & set(f.parts) and "diffusers" in _imports(f)
    ]
    assert not offenders


def test_peft_only_in_teachers():
    # peft (LoRA students, rcm_core/teachers/lora.py) is for diffusers teachers only: nowhere else in rcm_core
    offenders = [
        str(f.relative_to(ROOT))
        for f in (ROOT / "rcm_core").rglob("*.py")
        if "teachers" not in f.parts and "peft" in _imports(f)
    ]
    assert not offenders


def test_transformers_only_in_teachers():
    # transformers (the pipelines' text encoders, rcm data prepare) costs seconds of import, like diffusers
    offenders = [
        str(f.relative_to(ROOT))
        for f in (ROOT / "rcm_core").rglob("*.py")
        if "teachers" not in f.parts and "transformers" in _imports(f)
    ]
    assert not offenders


def test_importing_rcm_core_cli_and_data_prepare_does_not_import_diffusers_or_transformers():
    import subprocess
    import sys

    code = (
        "import sys, rcm_core.cli, rcm_core.data.prepare, rcm_core.teachers.pipeline_parts; "
        "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_importing_rcm_core_tasks_does_not_import_diffusers():
    import subprocess
    import sys

    code = (
        "import sys, rcm_core.tasks, rcm_core.teachers, rcm_core.distill; "
        "print(sorted(m for m in ('diffusers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def _module_graph(packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in the file: a function-level import runs too).

    `from pkg import name` depends on pkg.name when that is a module, else on pkg itself.
    """
    files = {}
    for package in packages:
        for f in (ROOT / package).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for name, f in files.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = {f"{node.module}.{a.name}" for a in node.names} & files.keys()
                deps |= subs or {node.module}
        graph[name] = (deps & files.keys()) - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def test_no_import_cycles_between_project_modules():
    """e.g. workers.train_loop -> workers.entrypoint -> workers.launch -> workers.train_loop (issue 16)."""
    graph = _module_graph(("workers", "rcm_core", "rcm_client", "service"))
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
