"""The Dockerfiles, offline (no Docker engine here): what they COPY exists and is not .dockerignored, they are
multi-stage, run as a non-root user, carry a healthcheck and install from constraints.txt; the control-plane
image's package list is pinned and covers every import of service/."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy import checks

DOCKERFILES = sorted((checks.ROOT / "deploy" / "docker").glob("*.Dockerfile"))


def final_stage(path):
    instructions = checks.dockerfile_instructions(path)
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions, instructions[last_from:]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (checks.ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_every_image_is_built_by_compose():
    compose = yaml.safe_load((checks.ROOT / "docker-compose.yml").read_text())
    built = {
        (checks.ROOT / s["build"]["context"] / s["build"]["dockerfile"]).resolve()
        for s in compose["services"].values()
        if "build" in s
    }
    for s in compose["services"].values():
        if "build" in s:
            assert (checks.ROOT / s["build"]["context"]).is_dir()
    assert {p.resolve() for p in DOCKERFILES} == built
    assert {p.name for p in DOCKERFILES} >= {"api.Dockerfile", "ray.Dockerfile", "mlflow.Dockerfile"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist_and_reach_the_build_context(path):
    patterns = checks.dockerignore_patterns()
    sources = checks.copy_sources(path)
    assert sources, f"{path.name} copies nothing"
    for src in sources:
        assert (checks.ROOT / src).exists(), f"{path.name}: COPY {src} does not exist"
        assert not checks.dockerignored(src, patterns), f"{path.name}: COPY {src} is excluded by .dockerignore"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_is_multi_stage_non_root_with_healthcheck(path):
    instructions, final = final_stage(path)
    assert sum(word == "FROM" for word, _ in instructions) >= 2, "build tools stay in the build stage"
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{path.name}: the final stage must switch to a non-root user"
    assert any(word == "HEALTHCHECK" for word, _ in final), f"{path.name}: no HEALTHCHECK"
    for word, args in instructions:
        if word == "RUN" and "pip install" in args:
            assert "-c constraints.txt" in args, f"{path.name}: pip install without the project's pins: {args}"


def test_dockerignore_keeps_secrets_and_local_state_out():
    patterns = checks.dockerignore_patterns()
    for path in (".env", ".venv/bin/python", ".data/rcm.db", ".git/config", "service/__pycache__/x.pyc", "runs/a"):
        assert checks.dockerignored(path, patterns), path
    for path in (".env.example", "service/main.py", "constraints.txt", "README.md"):
        assert not checks.dockerignored(path, patterns), path


def api_packages() -> list[str]:
    (args,) = [a for w, a in checks.dockerfile_instructions(checks.ROOT / "deploy/docker/api.Dockerfile") if w == "ARG"]
    name, _, value = args.partition("=")
    assert name == "SERVICE_PACKAGES"
    return value.strip('"').split()


def _requirements_closure(names: set[str]) -> set[str]:
    """The installed distributions `names` pull in (this venv's metadata), themselves included."""
    seen, todo = set(), list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for spec in requires:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_api_image_packages_are_pinned_and_cover_service_imports():
    pins = constraints()
    packages = {canonicalize_name(Requirement(p).name) for p in api_packages()}
    assert packages <= pins.keys(), f"not pinned in constraints.txt: {sorted(packages - pins.keys())}"
    assert not packages & {"torch", "ray", "triton"}, "the control plane image stays small"
    installed = _requirements_closure(packages)
    top_level = importlib.metadata.packages_distributions()
    for path in sorted((checks.ROOT / "service").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            for module in names:
                if module in sys.stdlib_module_names or module in ("service", "__future__"):
                    continue
                dists = {canonicalize_name(d) for d in top_level.get(module, [module])}
                assert dists & installed, f"{path.relative_to(checks.ROOT)} imports {module}: not in the API image"


def test_ray_image_probes_work_with_kuberay():
    """KubeRay's default probes exec `wget` in the Ray container; python:3.11-slim has no wget of its own."""
    text = (checks.ROOT / "deploy/docker/ray.Dockerfile").read_text()
    assert re.search(r"apt-get install[^\n]*\bwget\b", text)
