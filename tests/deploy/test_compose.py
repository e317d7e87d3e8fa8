"""docker-compose.yml, offline: the Compose Specification schema, secrets from .env, health-gated start order,
GPU reservation, named volumes, and every variable the code reads set on the service that runs the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from service.settings import Settings
from tests.deploy import checks

COMPOSE = checks.ROOT / "docker-compose.yml"
BROKEN = Path(__file__).parent / "broken" / "docker-compose.yml"
RAY_SERVICES = ("ray-head", "ray-worker", "ray-worker-cpu")
REQUIRED = re.compile(r"\$\{(\w+):\?[^}]*\}")  # ${VAR:?message}: compose refuses to start without VAR
DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str) -> str:
    """What compose substitutes, with a hex stand-in for every required secret."""
    return DEFAULTED.sub(lambda m: m.group(2), REQUIRED.sub("0123456789abcdef", value))


def test_compose_file_is_valid(compose):
    assert checks.compose_errors(compose) == []


def test_broken_compose_is_rejected():
    """tests/deploy/broken/docker-compose.yml: an unknown key, a bad depends_on condition, a numeric healthcheck
    interval; then, valid against the schema once those are fixed, the API misses a setting and hard-codes a secret."""
    broken = yaml.safe_load(BROKEN.read_text())
    errors = "\n".join(checks.compose_errors(broken))
    assert "'restart_policy' does not match any of the regexes" in errors  # only x- extensions are free
    assert "services.api.depends_on" in errors  # condition: service_ready
    assert "services.postgres.healthcheck.interval" in errors
    api = broken["services"]["api"]
    del api["restart_policy"], api["depends_on"]["postgres"], broken["services"]["postgres"]["healthcheck"]
    assert checks.compose_errors(broken) == []
    assert "S3_SECRET_KEY" in checks.api_reads("ray-jobs") - checks.compose_env(api).keys()
    assert not REQUIRED.search(checks.compose_env(api)["S3_ACCESS_KEY"])  # a literal secret, not ${VAR:?...}


def test_required_variables_are_documented_in_env_example():
    text = COMPOSE.read_text()
    required = set(REQUIRED.findall(text))
    example = dict(
        ln.split("=", 1) for ln in (checks.ROOT / ".env.example").read_text().splitlines() if re.match(r"^\w+=", ln)
    )
    assert required == {"POSTGRES_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY", "RAY_AUTH_TOKEN"}
    assert required <= example.keys()
    assert all(example[name] == "" for name in required), ".env.example must not carry real or default secrets"
    optional = {m[0] for m in DEFAULTED.findall(text)} | {"COMPOSE_PROFILES"}
    commented = set(re.findall(r"^# (\w+)=", (checks.ROOT / ".env.example").read_text(), re.M))
    assert optional <= example.keys() | commented


def test_secrets_are_never_literals(compose):
    for name, service in compose["services"].items():
        for var, value in checks.compose_env(service).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", var):
                assert REQUIRED.fullmatch(value), f"{name}: {var} must be ${{VAR:?...}}, not {value!r}"


def test_start_order_waits_for_health(compose):
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions, not a list"
        for target, how in depends.items():
            if how["condition"] == "service_healthy":
                has_check = "healthcheck" in services[target]
                assert has_check, f"{name} waits for {target}'s health, which has no healthcheck"
            elif how["condition"] == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} is a one-shot job"
            else:
                pytest.fail(f"{name} -> {target}: start only on health or completion")
    assert set(services["api"]["depends_on"]) == {"postgres", "bucket-init", "mlflow", "ray-head"}


def test_ray_nodes_get_shared_memory_and_gpus(compose):
    services = compose["services"]
    for name in RAY_SERVICES:
        assert services[name]["shm_size"], f"{name}: Ray's object store needs /dev/shm"
    (device,) = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert services["ray-worker"]["profiles"] == ["gpu"] and services["ray-worker-cpu"]["profiles"] == ["cpu"]
    assert "deploy" not in services["ray-worker-cpu"]


def test_state_lives_in_named_volumes(compose):
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if source.startswith("."):  # a bind mount of a file from this repository
                assert (checks.ROOT / source).is_file(), f"{name}: {source} does not exist"
                assert mount.endswith(":ro"), f"{name}: bind mounts are read-only"
            else:
                assert source in declared, f"{name}: {source} is not a declared named volume"
    assert {"pgdata", "s3data"} <= declared


def test_published_ports_stay_on_this_machine(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} would listen on every interface"


def test_compose_sets_every_variable_the_code_reads(compose):
    services = compose["services"]
    api = checks.compose_env(services["api"])
    assert api["CLUSTER_BACKEND"] == "ray-jobs"
    missing = checks.api_reads("ray-jobs") - api.keys()
    assert not missing, f"api: set {sorted(missing)} in docker-compose.yml"
    for name in RAY_SERVICES:
        missing = checks.ray_node_reads() - checks.compose_env(services[name]).keys()
        assert not missing, f"{name}: set {sorted(missing)} (the worker code reads them on every node)"
    bucket_init = checks.compose_env(services["bucket-init"])
    assert set(checks.env_reads("deploy/compose")) <= bucket_init.keys()


def test_compose_api_environment_is_valid_settings(compose):
    env = {k: interpolate(v) for k, v in checks.compose_env(compose["services"]["api"]).items()}
    settings = Settings(_env_file=None, **env)
    assert settings.ENVIRONMENT == "production" and settings.DATABASE_URL.startswith("postgresql+psycopg://")
    assert settings.MLFLOW_TRACKING_URI == "http://mlflow:5000"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing mlflow.server warns (SQLAlchemy)
def test_mlflow_accepts_the_host_names_it_is_called_by(compose):
    """MLflow 3 answers 403 to Host headers other than localhost and private IPs (checked with its own function)."""
    from urllib.parse import urlsplit

    from mlflow.server.security_utils import is_allowed_host_header

    allowed = checks.compose_env(compose["services"]["mlflow"])["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    host = urlsplit(checks.compose_env(compose["services"]["api"])["MLFLOW_TRACKING_URI"]).netloc
    assert is_allowed_host_header(allowed, host) and not is_allowed_host_header(allowed, "evil.example:5000")


def test_every_variable_read_anywhere_is_deployed_or_listed():
    """A new os.environ read anywhere must be set by a deployment (checked above and in test_kubernetes.py) or
    listed in checks.NOT_DEPLOYED with the reason it is left unset."""
    reads = checks.env_reads("service", "workers", "scripts", "rcm_core", "rcm_client", "deploy")
    deployed = checks.settings_fields() | checks.per_job_env() | checks.per_operation_env() | checks.ray_node_reads()
    deployed |= set(checks.env_reads("deploy/compose"))
    unaccounted = {
        var: sorted(files) for var, files in reads.items() if var not in deployed | checks.NOT_DEPLOYED.keys()
    }
    assert not unaccounted, f"set these in docker-compose.yml and deploy/kubernetes, or list them: {unaccounted}"
    assert checks.ray_node_reads() == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}  # today's node-level needs


def test_only_the_api_and_loopback_consoles_are_published(compose):
    """MLflow has no authentication and the Ray dashboard only a token: neither may be reachable from another
    machine. S3 and PostgreSQL publish nothing; the MLflow UI and Ray dashboard only on 127.0.0.1 (an SSH tunnel
    reaches them); the Ray nodes keep token auth on."""
    published = {name: svc.get("ports", []) for name, svc in compose["services"].items() if svc.get("ports")}
    assert set(published) <= {"api", "mlflow", "ray-head"}, published
    for name in ("mlflow", "ray-head"):
        assert all(str(p).startswith("127.0.0.1:") for p in published.get(name, [])), published[name]
    for name, svc in compose["services"].items():
        assert svc.get("network_mode") != "host", f"{name}: host networking publishes every port"
        if name.startswith("ray-"):
            assert svc["environment"]["RAY_AUTH_MODE"] == "token", name
