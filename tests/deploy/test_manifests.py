"""The Kubernetes manifests (deploy/k8s) say what the code needs: `make lint` checks them against
the Kubernetes schemas; this checks them against the program (no cluster here to run them)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import yaml

from devstack.settings import ROOT
from worker import GRACEFUL_SHUTDOWN

K8S = ROOT / "deploy" / "k8s"
ROLES = ("worker", "web", "codec-server", "toolbox")


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            found[(document["kind"], document["metadata"]["name"])] = document
    return found


def pods(kind: str) -> dict[str, dict[str, Any]]:
    return {
        name: document["spec"]["template"]["spec"]
        for (found, name), document in manifests().items()
        if found == kind
    }


def test_kustomize_applies_every_manifest_with_the_four_images() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    images = {i["name"] for i in kustomization["images"]}
    used = {
        container["image"].split(":")[0]
        for kind in ("Deployment", "Job")
        for pod in pods(kind).values()
        for container in pod["containers"]
    }
    assert used == images == {f"referral-desk-{role}" for role in ROLES}


def test_no_secret_value_is_in_a_manifest() -> None:
    assert not any(kind == "Secret" for kind, _ in manifests())
    config = manifests()[("ConfigMap", "referral-desk-config")]["data"]
    for secret in ("DATABASE_URL", "ENCRYPTION_KEYS", "SECRET_KEY", "SMTP_PASSWORD"):
        assert f"REFERRALS_{secret}" not in config
        assert config[f"REFERRALS_{secret}_FILE"].startswith("/run/secrets/referral-desk/")


def test_every_container_is_locked_down_sized_and_probed() -> None:
    for kind in ("Deployment", "Job"):
        for name, pod in pods(kind).items():
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            for container in pod["containers"]:
                assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
                assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], name
                assert set(container["resources"]) == {"requests", "limits"}, name
                assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), name
                if kind == "Deployment":
                    assert container["livenessProbe"]["httpGet"]["path"] == "/livez", name
                    assert container["readinessProbe"]["httpGet"]["path"] in ("/readyz", "/livez")


def test_a_stopped_worker_has_time_to_finish_its_activities() -> None:
    worker = pods("Deployment")["referral-desk-worker"]
    grace = timedelta(seconds=worker["terminationGracePeriodSeconds"])
    assert grace >= GRACEFUL_SHUTDOWN + timedelta(seconds=15)
    [container] = worker["containers"]
    environment = {e["name"]: e["value"] for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probed = container["readinessProbe"]["httpGet"]["port"]
    assert ports[probed] == int(environment["REFERRALS_HEALTH_PORT"])
    assert ports["metrics"] == int(environment["REFERRALS_METRICS_PORT"])
    disruption = manifests()[("PodDisruptionBudget", "referral-desk-worker")]
    assert disruption["spec"]["minAvailable"] == 1


def test_the_jobs_are_the_rollout_steps_run_with_the_toolbox() -> None:
    assert {name: pod["containers"][0]["args"] for name, pod in pods("Job").items()} == {
        "referral-desk-migrate": ["db", "upgrade"],
        "referral-desk-temporal-setup": ["temporal", "setup", "--retention", "30"],
        "referral-desk-replay-check": ["replay-check"],
    }


def test_the_deploy_guide_covers_every_manifest() -> None:
    guide = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    for path in K8S.glob("*.yaml"):
        assert f"deploy/k8s/{path.name}" in guide, path
