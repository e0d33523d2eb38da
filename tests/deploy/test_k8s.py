"""deploy/k8s validates against the Kubernetes API schemas (kubernetes-validate, offline, strict).

Strict mode rejects unknown fields, so a misspelt key fails here instead of being dropped by
the API server. When kubectl is installed, its built-in kustomize must render the same set.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
# the oldest release still in common managed-cluster support, and a recent one
VERSIONS = ("1.29.0", "1.33.0")


def kustomization() -> dict[str, Any]:
    return dict(yaml.safe_load((K8S / "kustomization.yaml").read_text()))


def documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def pod_specs() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in documents()
            if d["kind"] in ("Deployment", "StatefulSet")}


def test_every_manifest_is_listed_in_the_kustomization() -> None:
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization()["resources"]) == on_disk


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_strictly(version: str) -> None:
    docs = documents()
    assert len(docs) >= 14
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_catches_what_the_api_server_would_reject() -> None:
    worker = next(d for d in documents() if d["metadata"]["name"] == "codeloop-worker")
    mutations: list[Callable[[dict[str, Any]], object]] = [
        lambda d: d["spec"].__setitem__("replicas", "two"),
        lambda d: d["spec"]["template"]["spec"]["containers"][0].__setitem__("imagePullPolicyy", "Always"),
        lambda d: d["spec"].pop("selector"),
    ]
    for mutate in mutations:
        broken = copy.deepcopy(worker)
        mutate(broken)
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_every_image_can_be_overridden_through_kustomize() -> None:
    overridable = {i["name"] for i in kustomization()["images"]}
    used = {c["image"] for spec in pod_specs().values() for c in spec["containers"]}
    assert used <= overridable, used - overridable


def test_codeloop_pods_are_non_root_read_only_and_capability_free() -> None:
    for name, spec in pod_specs().items():
        for container in spec["containers"]:
            ctx = container.get("securityContext", {})
            if container["name"] == "dind":
                # the one privileged container, alone on the sandbox pool
                assert spec["nodeSelector"] == {"codeloop.dev/pool": "sandbox"}
                continue
            assert ctx.get("allowPrivilegeEscalation") is False, name
            assert ctx.get("capabilities") == {"drop": ["ALL"]}, name
            assert "resources" in container and container["resources"]["requests"], name
            if name == "tgi":
                continue  # upstream image: root, writes caches outside its volume
            assert ctx.get("readOnlyRootFilesystem") is True, name
            run_as = ctx.get("runAsUser", spec.get("securityContext", {}).get("runAsUser"))
            assert run_as != 0 or container["name"] == "docker-proxy", name


def test_gpu_work_lands_on_the_gpu_pool_and_sandboxes_elsewhere() -> None:
    specs = pod_specs()
    for name in ("tgi", "codeloop-worker-gpu"):
        assert specs[name]["nodeSelector"] == {"codeloop.dev/pool": "gpu"}
        limits = specs[name]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"
    worker_env = next(d for d in documents() if d["kind"] == "ConfigMap")["data"]
    assert worker_env["DOCKER_HOST"] == "tcp://sandbox-engine:2376"  # TLS: tests/deploy/test_proxy_listener.py
    assert "docker.sock" not in yaml.safe_dump(specs["codeloop-worker"])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kubectl_kustomize_renders_the_same_objects() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in documents()
    )
    assert all(d["metadata"].get("namespace") == "codeloop" for d in rendered if d["kind"] != "Namespace")
