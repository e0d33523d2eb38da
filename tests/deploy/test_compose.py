"""docker-compose.yml and .env.example: in step with bot/core/settings.py, and the security shape holds.

The compose file is resolved by Debian's docker-compose 1.29 (`config`), the same binary the
CI smoke test runs, so these assertions are about what compose will really start.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = ROOT / ".env.example"
COMPOSE = ROOT / "docker-compose.yml"
PROFILES = ("tgi", "gpu", "cpu", "slack", "discord", "console", "build")
APP_SERVICES = ("worker", "worker-gpu", "worker-cpu", "slack", "discord", "console", "doctor")
_ENTRY = re.compile(r"^#?((?:CODELOOP|DEPLOY)_[A-Z0-9_]+)=(.*)$")


def env_entries() -> dict[str, tuple[str, str]]:
    """name -> (value shown, comment above it); each variable must appear exactly once."""
    entries: dict[str, tuple[str, str]] = {}
    comment = ""
    for line in ENV_EXAMPLE.read_text().splitlines():
        if m := _ENTRY.match(line):
            assert m.group(1) not in entries, f"{m.group(1)} listed twice"
            entries[m.group(1)] = (m.group(2), comment)
            comment = ""
        elif line.startswith("# ") and not line.startswith("# ----"):
            comment = line[2:].strip()
        else:
            comment = ""
    return entries


def shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


def _default(field: Any) -> Any:
    return field.default_factory() if field.default_factory else field.default


def test_env_example_lists_every_setting_with_its_default_and_a_comment() -> None:
    entries = env_entries()
    settings = {f"CODELOOP_{name.upper()}": field for name, field in Settings.model_fields.items()}
    listed = {name for name in entries if name.startswith("CODELOOP_")}
    missing = [
        f"# {settings[n].description or 'WHAT IT DOES'}\n#{n}={shown(_default(settings[n]))}"
        for n in sorted(set(settings) - listed)
    ]
    assert not missing, "add to .env.example (with a better comment where needed):\n" + "\n".join(missing)
    assert listed <= set(settings), f"not settings any more: {listed - set(settings)}"
    for name, field in settings.items():
        default = _default(field)
        value, comment = entries[name]
        assert value == shown(default), f"{name}: .env.example shows {value!r}, the default is {shown(default)!r}"
        assert comment, f"{name} has no comment line above it"


def test_the_example_loads_as_settings_when_every_line_is_uncommented(tmp_path: Path) -> None:
    env = {name: value for name, (value, _) in env_entries().items() if name.startswith("CODELOOP_") and value}
    settings = Settings.load(**{name[len("CODELOOP_"):].lower(): value for name, value in env.items()})
    assert settings.sandbox_image == "codeloop-sandbox:latest"


def test_every_compose_variable_is_documented_with_the_same_default() -> None:
    text = COMPOSE.read_text()
    used = dict(re.findall(r"\$\{((?:CODELOOP|DEPLOY)_[A-Z0-9_]+):-([^}]*)\}", text))
    entries = env_entries()
    deploy_listed = {n for n in entries if n.startswith("DEPLOY_")}
    assert {n for n in used if n.startswith("DEPLOY_")} == deploy_listed
    for name, default in used.items():
        assert name in entries, f"{name} is used by docker-compose.yml but not in .env.example"
        if name.startswith("DEPLOY_"):
            shown_default = entries[name][0]
            assert shown_default == default, f"{name}: compose default {default!r}, .env.example {shown_default!r}"


def test_nothing_secret_is_written_into_compose() -> None:
    text = COMPOSE.read_text()
    assert not re.search(r"(xox[abp]-|xapp-|hf_[A-Za-z0-9]{10})", text)
    for name in ("TOKEN", "SECRET", "PASSWORD"):
        for line in text.splitlines():
            if name in line and ":" in line and not line.strip().startswith("#"):
                assert "${" in line, f"a literal secret-looking value: {line.strip()}"


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose not installed (scripts/bootstrap installs Debian's)")
    env = tmp_path_factory.mktemp("compose") / "empty.env"
    env.write_text("")
    args = ["docker-compose", "--env-file", str(env), "-f", str(COMPOSE)]
    for profile in PROFILES:
        args += ["--profile", profile]
    out = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin", "DEPLOY_ENV_FILE": str(env)})
    assert out.returncode == 0, out.stderr
    return dict(yaml.safe_load(out.stdout))


def test_redis_is_durable_and_health_checked(resolved: dict[str, Any]) -> None:
    redis = resolved["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert any(v.startswith("redis-data:/data") for v in _volumes(redis))
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])


def test_only_the_proxy_holds_the_docker_socket(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    holders = [name for name, svc in services.items() if any("docker.sock:" in v for v in _volumes(svc))]
    assert holders == ["docker-proxy"]
    proxy = services["docker-proxy"]
    assert not any(k.startswith("CODELOOP_") and k != "CODELOOP_SANDBOX_IMAGE" for k in proxy.get("environment", {}))
    for name in ("worker", "worker-gpu", "worker-cpu", "doctor"):
        assert services[name]["environment"]["DOCKER_HOST"] == "unix:///run/codeloop-engine/docker.sock"
    for name in ("slack", "discord", "console", "redis", "tgi"):
        assert "DOCKER_HOST" not in services[name].get("environment", {})
        assert not any("engine" in v for v in _volumes(services[name])), name


def test_app_services_are_hardened(resolved: dict[str, Any]) -> None:
    for name in (*APP_SERVICES, "docker-proxy"):
        svc = resolved["services"][name]
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name
        assert svc.get("privileged") is not True, name
        assert svc["image"].startswith("codeloop:"), name


def test_gpu_services_reserve_a_gpu_and_sit_behind_profiles(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    for name in ("tgi", "worker-gpu"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["tgi"]["environment"]["MODEL_ID"] == "m-a-p/OpenCodeInterpreter-DS-6.7B"
    assert "deploy" not in services["worker-cpu"] and services["worker-cpu"]["environment"]["CODELOOP_DEVICE"] == "cpu"
    expected = {"tgi": ["tgi"], "worker-gpu": ["gpu"], "worker-cpu": ["cpu"], "slack": ["slack"],
                "discord": ["discord"], "sandbox": ["build"]}
    assert {n: services[n].get("profiles") for n in expected} == expected
    for name in ("redis", "docker-proxy", "worker"):
        assert not services[name].get("profiles"), name


def test_every_image_follows_its_override(tmp_path: Path, resolved: dict[str, Any]) -> None:
    env = tmp_path / "override.env"
    overrides = {
        "DEPLOY_IMAGE": "registry.example/codeloop:1", "DEPLOY_GPU_IMAGE": "registry.example/codeloop:1-gpu",
        "DEPLOY_CPU_IMAGE": "registry.example/codeloop:1-cpu",
        "DEPLOY_REDIS_IMAGE": "registry.example/redis:7", "DEPLOY_TGI_IMAGE": "registry.example/tgi:3",
        "CODELOOP_SANDBOX_IMAGE": "registry.example/sandbox:1", "DEPLOY_ENV_FILE": str(env),
        "DEPLOY_BASE_IMAGE": "registry.example/python:3.12-slim", "DEPLOY_TGI_QUANTIZE": "eetq",
    }
    env.write_text("".join(f"{k}={v}\n" for k, v in overrides.items()))
    args = ["docker-compose", "--env-file", str(env), "-f", str(COMPOSE)]
    for profile in PROFILES:
        args += ["--profile", profile]
    out = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    images = {name: svc["image"] for name, svc in services.items()}
    assert all(image.startswith("registry.example/") for image in images.values()), images
    assert services["worker"]["build"]["args"]["BASE"] == "registry.example/python:3.12-slim"
    assert services["docker-proxy"]["environment"]["PROXY_ALLOWED_IMAGES"] == "registry.example/sandbox:1"
    assert services["worker"]["environment"]["CODELOOP_SANDBOX_IMAGE"] == "registry.example/sandbox:1"
    assert services["tgi"]["environment"]["QUANTIZE"] == "eetq"


def _volumes(service: dict[str, Any]) -> list[str]:
    out = []
    for v in service.get("volumes", []):
        out.append(v if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}")  # long syntax
    return out


def test_bots_are_health_checked_on_their_health_endpoint(resolved: dict[str, Any]) -> None:
    """/healthz reflects Redis and the platform connection (tests/deploy/test_health.py proves it);
    /metrics answered even when both were down."""
    for name in ("slack", "discord"):
        svc = resolved["services"][name]
        test = " ".join(svc["healthcheck"]["test"])
        assert "/healthz" in test and "CODELOOP_METRICS_PORT" in test, name
        assert svc["environment"]["CODELOOP_METRICS_PORT"] == "9100", name


def test_in_process_workers_get_the_hub_settings_and_a_model_cache(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    for name in ("worker-gpu", "worker-cpu"):
        env = services[name]["environment"]
        assert env["HF_HOME"] == "/models" and env["HF_HUB_OFFLINE"] == "0" and "HF_TOKEN" in env, name
        assert any(v.startswith("models:/models") for v in _volumes(services[name])), name
    assert services["tgi"]["environment"]["HF_HUB_OFFLINE"] == "0" and "HF_TOKEN" in services["tgi"]["environment"]


def test_the_worker_names_the_model_tgi_serves(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    served = services["tgi"]["environment"]["MODEL_ID"]
    assert services["worker"]["environment"]["CODELOOP_MODEL"] == served
    assert services["doctor"]["environment"]["CODELOOP_MODEL"] == served


def test_a_pip_mirror_reaches_every_image_build(tmp_path: Path) -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose not installed (scripts/bootstrap installs Debian's)")
    env = tmp_path / "mirror.env"
    env.write_text(f"DEPLOY_PIP_INDEX_URL=https://pypi.example/simple\nDEPLOY_ENV_FILE={env}\n")
    args = ["docker-compose", "--env-file", str(env), "-f", str(COMPOSE)]
    for profile in PROFILES:
        args += ["--profile", profile]
    out = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    built = {name: svc["build"]["args"] for name, svc in services.items() if "build" in svc}
    assert set(built) >= {"worker", "worker-gpu", "worker-cpu", "sandbox", "slack"}
    assert all(a["PIP_INDEX_URL"] == "https://pypi.example/simple" for a in built.values()), built
    for dockerfile in (ROOT / "deploy" / "Dockerfile", ROOT / "runner" / "Dockerfile"):
        assert "ARG PIP_INDEX_URL" in dockerfile.read_text(), dockerfile
