"""Offline validation of deployment files (no Docker engine runs here)."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).parents[2]
SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose_schema():
    if not SCHEMA.is_file():
        pytest.fail(f"compose schema missing at {SCHEMA} (CI lays ../shared beside the checkout)")
    return json.loads(SCHEMA.read_text())


def test_compose_file_is_valid(compose_schema):
    jsonschema.validate(yaml.safe_load((ROOT / "docker-compose.yml").read_text()), compose_schema)


def test_broken_compose_is_rejected(compose_schema):
    broken = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    broken["services"]["demo"]["restart_policy"] = "always"  # not a compose key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, compose_schema)


def test_dockerfiles_copy_existing_paths():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, svc in compose["services"].items():
        dockerfile = ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]
        assert dockerfile.is_file(), name
        for line in dockerfile.read_text().splitlines():
            m = re.match(r"COPY (?!--from)(.+) \S+$", line.strip())
            if m:
                for src in m.group(1).split():
                    assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
