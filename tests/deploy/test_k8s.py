"""deploy/k8s validates against the Kubernetes API schemas (kubernetes-validate, offline, strict).

Strict mode rejects unknown fields, so a misspelt key fails here instead of being dropped by
the API server. When kubectl is installed, its built-in kustomize must render the same set.
"""

from __future__ import annotations

import contextlib
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
    assert len(docs) >= 19
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
    assert "DOCKER_HOST" not in worker_env  # the engines' list instead (test below)
    assert "docker.sock" not in yaml.safe_dump(specs["codeloop-worker"])


def test_the_sandbox_tier_is_n_engines_the_workers_list_by_stable_name() -> None:
    """Item 3 of issue 18: validated only (no cluster here); runner/engines.py parses the list."""
    from bot.core.settings import Settings
    from runner.engines import parse_engines

    docs = documents()
    [engine] = [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "sandbox-engine"]
    [service] = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "sandbox-engine"]
    replicas = engine["spec"]["replicas"]
    assert replicas >= 2 and engine["spec"]["serviceName"] == "sandbox-engine"
    assert service["spec"]["clusterIP"] == "None"  # headless: a DNS name per pod
    pod = engine["spec"]["template"]["spec"]
    [rule] = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert rule["topologyKey"] == "kubernetes.io/hostname"
    assert rule["labelSelector"]["matchLabels"] == engine["spec"]["selector"]["matchLabels"]
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    settings = Settings.load(**{k.removeprefix("CODELOOP_").lower(): v for k, v in config.items()
                                if k.startswith("CODELOOP_")})
    specs = parse_engines(settings.sandbox_engines, settings.sandbox_engine_sessions,
                          settings.sandbox_engine_memory, settings.sandbox_engine_tls_dir)
    namespace = kustomization()["namespace"]
    assert [s.url for s in specs] == [f"tcp://sandbox-engine-{i}.sandbox-engine.{namespace}.svc:2376"
                                      for i in range(replicas)]
    assert len({s.name for s in specs}) == replicas
    assert all(s.tls_dir == "/etc/codeloop/docker-tls" for s in specs)
    workers = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("codeloop-worker")]
    for worker in workers:
        mounts = {m["mountPath"] for m in worker["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert settings.sandbox_engine_tls_dir in mounts
    # the engines' sandboxes fit in the dind container: the per-engine memory limit is below it
    dind = next(c for c in pod["containers"] if c["name"] == "dind")
    assert specs[0].max_memory is not None
    assert specs[0].max_memory < int(dind["resources"]["limits"]["memory"].removesuffix("Gi")) << 30


def render() -> list[dict[str, Any]]:
    """What ``kubectl kustomize deploy/k8s`` makes of the files, for the two transformers this
    kustomization uses (namespace, images): runs everywhere, kubectl or not."""
    k = kustomization()
    images = {i["name"]: f"{i.get('newName', i['name'])}:{i['newTag']}" for i in k["images"]}
    out = []
    for doc in copy.deepcopy(documents()):
        if doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = k["namespace"]
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                container["image"] = images.get(container["image"], container["image"])
        out.append(doc)
    return out


def test_no_image_is_latest() -> None:
    rendered = [c["image"] for d in render() if d["kind"] in ("Deployment", "StatefulSet")
                for c in d["spec"]["template"]["spec"]["containers"]]
    assert rendered and all(":" in i and not i.endswith(":latest") for i in rendered), rendered
    config = next(d for d in documents() if d["kind"] == "ConfigMap")["data"]
    for key in ("CODELOOP_SANDBOX_IMAGE", "SANDBOX_IMAGE_REF"):
        assert not config[key].endswith(":latest") and ":" in config[key], key


def _container(name: str) -> dict[str, Any]:
    return pod_specs()[name]["containers"][0]


def test_bots_and_workers_are_probed_on_their_health_endpoints() -> None:
    """The endpoints bot/ops/metrics_server.py serves (tests/deploy/test_health.py proves what they say)."""
    for name in ("codeloop-slack", "codeloop-discord"):
        container = _container(name)
        assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}, name
        assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}, name
    for name in ("codeloop-worker", "codeloop-worker-gpu"):
        assert _container(name)["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}, name
    assert _container("codeloop-worker-gpu")["startupProbe"]["failureThreshold"] >= 60  # weights load first
    for name, spec in pod_specs().items():
        for container in spec["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            if name.startswith("codeloop-"):
                assert ports["metrics"] == 9100, name


def test_slack_http_mode_has_a_service_and_disruptions_take_one_pod_at_a_time() -> None:
    docs = documents()
    [service] = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "codeloop-slack"]
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "codeloop-slack"}
    assert service["spec"]["ports"] == [{"name": "events", "port": 3000, "targetPort": "events"}]
    events = {p["name"]: p["containerPort"] for p in _container("codeloop-slack")["ports"]}["events"]
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert events == int(config.get("CODELOOP_SLACK_HTTP_PORT", 3000))
    budgets = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert set(budgets) == {"codeloop-worker", "codeloop-slack", "sandbox-engine"}
    labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs
              if d["kind"] in ("Deployment", "StatefulSet")}
    for name, spec in budgets.items():
        assert spec["maxUnavailable"] == 1
        assert spec["selector"]["matchLabels"].items() <= labels[name].items(), name


def test_model_weights_live_on_volumes_that_outlast_the_pod_and_tgi_is_not_root() -> None:
    docs = documents()
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    specs = pod_specs()
    for name, volume, claim in (("tgi", "data", "tgi-data"), ("codeloop-worker-gpu", "models", "codeloop-models")):
        [vol] = [v for v in specs[name]["volumes"] if v["name"] == volume]
        assert vol == {"name": volume, "persistentVolumeClaim": {"claimName": claim}}, name
        assert claim in claims
        deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name)
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}, name  # ReadWriteOnce
    tgi = specs["tgi"]
    assert tgi["securityContext"]["runAsNonRoot"] is True and tgi["securityContext"]["runAsUser"] != 0
    port = {p["name"]: p["containerPort"] for p in tgi["containers"][0]["ports"]}["http"]
    assert port >= 1024  # a non-root process cannot bind below 1024 without a capability
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "tgi-from-workers")
    assert policy["spec"]["ingress"][0]["ports"][0]["port"] == port
    for name in ("tgi", "codeloop-worker-gpu"):
        env = {e["name"] for e in specs[name]["containers"][0]["env"]}
        assert {"HF_TOKEN", "HF_HUB_OFFLINE"} <= env, name


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed; test_no_image_is_latest "
                    "and the checks above run on the same render without it")
def test_kubectl_kustomize_renders_the_same_objects() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]

    def key(d: dict[str, Any]) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    ours = {key(d): d for d in render()}
    assert sorted(map(key, rendered)) == sorted(ours)
    for doc in rendered:
        assert doc["metadata"].get("namespace") == ours[key(doc)]["metadata"].get("namespace")
        if doc["kind"] in ("Deployment", "StatefulSet"):
            images = [c["image"] for c in doc["spec"]["template"]["spec"]["containers"]]
            assert images == [c["image"] for c in ours[key(doc)]["spec"]["template"]["spec"]["containers"]]


def test_one_wildcard_certificate_verifies_every_engine_replica(tmp_path: Path) -> None:
    """The name sandbox-engine.yaml tells operators to sign covers sandbox-engine-<i>..., as the
    workers (requests and runner/attach.py, both Python's ssl) verify it; a stranger's name fails."""
    import socket
    import ssl
    import threading

    root = K8S.parents[1]
    subprocess.run(["sh", str(root / "deploy/proxy-certs.sh"), str(tmp_path), "*.sandbox-engine.codeloop.svc"],
                   check=True, capture_output=True)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "server/cert.pem", tmp_path / "server/key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(3):
            conn, _ = listener.accept()
            with contextlib.suppress(ssl.SSLError, OSError), server_ctx.wrap_socket(conn, server_side=True):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(tmp_path / "client/ca.pem"))
    for name, ok in (("sandbox-engine-0.sandbox-engine.codeloop.svc", True),
                     ("sandbox-engine-7.sandbox-engine.codeloop.svc", True),
                     ("redis.codeloop.svc", False)):
        with socket.create_connection(("127.0.0.1", port)) as raw:
            if ok:
                client_ctx.wrap_socket(raw, server_hostname=name).close()
            else:
                with pytest.raises(ssl.SSLCertVerificationError):
                    client_ctx.wrap_socket(raw, server_hostname=name)
    thread.join(30)
    listener.close()


def test_slack_replicas_roll_one_at_a_time_with_time_to_hand_their_jobs_over() -> None:
    """A replica stopped by a rollout drains (bot/adapters/slack/cli.py: its render jobs go to the
    others; tests/faults/test_adapter_replicas.py proves it loses no reply) within its grace period,
    and the rollout never takes the last running replica first."""
    [slack] = [d for d in documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == "codeloop-slack"]
    assert slack["spec"]["strategy"] == {"type": "RollingUpdate",
                                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    assert pod_specs()["codeloop-slack"]["terminationGracePeriodSeconds"] >= 30
