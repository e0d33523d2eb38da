"""``codeloop doctor``: is this deployment able to answer a question? One line per check.

Checks what a job needs, in the order it needs it: settings, Redis, the Docker engine, the
sandbox image, the model (served under the name CODELOOP_MODEL gives), and the chat platform
tokens of the adapters that are configured, asked of Slack and Discord themselves
(bot/ops/doctor_http.py). Settings come from the environment and ./.env, as for every command.
A problem is one line naming what is wrong and how to fix it; the exit status is 1 when any
check failed (warnings do not fail), so it serves as a container healthcheck too
(``--only redis,docker,sandbox --quiet``). Nothing secret is printed: URLs lose their passwords.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bot.core.errors import ConfigError
from bot.core.settings import Settings
from bot.ops import doctor_http
from bot.ops.doctor_http import Advice, Problem, redact

Status = Literal["ok", "warn", "FAIL", "skip"]
CHECKS = ("settings", "redis", "docker", "sandbox", "model", "slack", "discord")
MIN_REDIS = (6, 2)  # XAUTOCLAIM, which reclaiming a dead worker's jobs relies on
SANDBOX_BUILD = "codeloop sandbox build (compose: docker-compose --profile build build sandbox)"


@dataclass
class Result:
    name: str
    status: Status
    text: str

    def line(self) -> str:
        return f"{self.status:<5} {self.name:<9} {self.text}"


class Doctor:
    def __init__(self, settings: Settings, timeout: float) -> None:
        self.settings = settings
        self.timeout = timeout
        self.engine_ok = False

    def redis(self) -> str:
        import redis

        from bot.queue import redis_conn

        url = redis_conn.where(self.settings) if self.settings.redis_sentinels else redact(self.settings.redis_url)
        client = redis_conn.sync_client(self.settings, self.timeout)
        try:
            info = client.info("server")
            persistence = client.info("persistence")
        except redis.AuthenticationError as exc:
            raise Problem(f"Redis at {url} refused our credentials ({exc})",
                          "put the password in CODELOOP_REDIS_URL (redis://:PASSWORD@host:6379/0)") from None
        except (redis.RedisError, OSError) as exc:
            raise Problem(f"Redis is not reachable at {url} ({exc})",
                          "start Redis (compose: the redis service) or set CODELOOP_REDIS_URL") from None
        finally:
            client.close()
        version = str(info.get("redis_version", "0"))
        if tuple(int(p) for p in version.split(".")[:2]) < MIN_REDIS:
            raise Problem(f"Redis {version} at {url} is older than 6.2 (no XAUTOCLAIM)",
                          "upgrade Redis to 6.2 or newer (compose uses 7.4)")
        if not int(persistence.get("aof_enabled", 0)):
            raise Advice(f"Redis {version} at {url} answers, but AOF is off: a crash loses queued jobs "
                           "(compose runs it with --appendonly yes --appendfsync everysec)")
        return f"Redis {version} at {url}, AOF on"

    def docker(self) -> str:
        import docker

        if self.settings.sandbox_engines:
            return self._engines(image=False)
        where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        try:
            client = docker.from_env(timeout=max(1, int(self.timeout)))
            try:
                version = client.version()
            finally:
                client.close()
        except Exception as exc:  # the SDK raises DockerException, requests errors or OSError here
            fix = ("give this user access to the socket (the docker group) or use the docker-proxy service"
                   if "ermission denied" in str(exc) else
                   "start dockerd, or set DOCKER_HOST (compose: the docker-proxy service must be up)")
            raise Problem(f"the Docker engine is not reachable at {where} ({_short(exc)})", fix) from None
        self.engine_ok = True
        return f"Docker {version.get('Version', '?')} (API {version.get('ApiVersion', '?')}) at {where}"

    def sandbox(self) -> str:
        import docker

        if self.settings.sandbox_engines:
            return self._engines(image=True)
        if not self.engine_ok:
            self.docker()  # its Problem says why the image cannot be looked for
        client = docker.from_env(timeout=max(1, int(self.timeout)))
        return self._image(client)

    def _image(self, client: Any) -> str:
        from docker.errors import ImageNotFound

        from runner.config import PROTOCOL

        image = self.settings.sandbox_image
        try:
            info = client.api.inspect_image(image)
        except ImageNotFound:
            raise Problem(f"the sandbox image {image} is not on the engine", SANDBOX_BUILD) from None
        except Exception as exc:
            raise Problem(f"cannot inspect the sandbox image {image} ({_short(exc)})",
                          "check CODELOOP_SANDBOX_IMAGE and that the docker proxy allows it") from None
        finally:
            client.close()
        labels = (info.get("Config") or {}).get("Labels") or {}
        if labels.get("codeloop.sandbox.protocol") != PROTOCOL:
            raise Problem(f"{image} is not a sandbox image of this codeloop version "
                          f"(protocol {labels.get('codeloop.sandbox.protocol')!r}, need {PROTOCOL!r})",
                          "rebuild it: " + SANDBOX_BUILD)
        return f"{image} ({str(info.get('Id', ''))[7:19]}, protocol {PROTOCOL})"

    def _engines(self, image: bool) -> str:
        """CODELOOP_SANDBOX_ENGINES: ready while one engine answers (and has the image); the others
        are a warning, since the worker sets them aside and keeps retrying them."""
        from runner.engines import parse_engines

        s = self.settings
        try:
            specs = parse_engines(s.sandbox_engines, s.sandbox_engine_sessions, s.sandbox_engine_memory,
                                  s.sandbox_engine_tls_dir)
        except ConfigError as exc:
            raise Problem(str(exc), "correct it (see .env.example)") from None
        ready, down = [], []
        for spec in specs:
            client = spec.client(max(1.0, self.timeout))
            try:
                self._image(client) if image else client.version()
                ready.append(spec.name)
            except Problem as exc:
                down.append(f"{spec.name}: {exc}")
            except Exception as exc:  # DockerException, requests errors or OSError
                down.append(f"{spec.name} at {spec.url}: {_short(exc)}")
            finally:
                client.close()
        what = f"the sandbox image {s.sandbox_image}" if image else "the engine"
        if not ready:
            raise Problem(f"no sandbox engine is ready ({'; '.join(down)})",
                          f"start the engines (and their docker proxies) or correct CODELOOP_SANDBOX_ENGINES; "
                          f"each needs {what}")
        self.engine_ok = True
        if down:
            raise Advice(f"{len(ready)} of {len(specs)} sandbox engines ready ({', '.join(ready)}); "
                         f"new sessions avoid the rest: {'; '.join(down)}")
        return f"{len(ready)} sandbox engines ready: {', '.join(ready)}" + (f" ({what})" if image else "")

    def model(self) -> str:
        if self.settings.backend == "transformers":
            return self._local_model()
        return doctor_http.model_server(self.settings, self.timeout)

    def _local_model(self) -> str:
        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            raise Problem(f"the transformers backend needs {' and '.join(missing)}",
                          "pip install 'codeloop[local]' (image codeloop:gpu), or set CODELOOP_LLM_URL")
        model = self.settings.model
        if Path(model).is_dir():
            if not (Path(model) / "config.json").is_file():
                raise Problem(f"{model} has no config.json", "point CODELOOP_MODEL at a saved model folder")
            where = "local folder"
        else:
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(model, "config.json"), str):
                raise Advice(f"{model} is not in the local Hugging Face cache: the first start downloads it "
                               "(needs Hub access; air-gapped sites copy it into HF_HOME)")
            where = "in the Hugging Face cache"
        device = self.settings.device
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise Problem(f"CODELOOP_DEVICE={device} but torch sees no CUDA device",
                              "install the NVIDIA driver and container toolkit, or set CODELOOP_DEVICE=cpu")
        return f"transformers backend, {model} ({where}), device {device}"

    def slack(self) -> str:
        return doctor_http.slack(self.settings, self.timeout)

    def discord(self) -> str:
        return doctor_http.discord(self.settings, self.timeout)


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def platform_enabled(settings: Settings, name: str) -> bool:
    """An adapter counts as deployed when any of its tokens is set."""
    if name == "slack":
        return any(v is not None for v in (settings.slack_bot_token, settings.slack_app_token,
                                           settings.slack_signing_secret))
    return settings.discord_token is not None


def run_checks(only: list[str], timeout: float) -> list[Result]:
    try:
        settings = Settings.load()
    except ConfigError as exc:
        return [Result("settings", "FAIL", f"{exc}. Fix: correct it in .env (see .env.example)")]
    results = [Result("settings", "ok", f"backend {settings.backend}, key prefix {settings.key_prefix}")]
    doctor = Doctor(settings, timeout)
    checks: dict[str, Callable[[], str]] = {
        "redis": doctor.redis, "docker": doctor.docker, "sandbox": doctor.sandbox, "model": doctor.model,
        # each CODELOOP_MODEL_PROFILES server, checked like the default one (``--only model`` includes them)
        **{f"model:{name}": functools.partial(doctor_http.model_profile, settings, name, timeout)
           for name in settings.profiles},
        "slack": doctor.slack, "discord": doctor.discord,
    }
    for name, check in checks.items():
        if only and name.partition(":")[0] not in only:
            continue
        if name in ("slack", "discord") and not only and not platform_enabled(settings, name):
            results.append(Result(name, "skip", f"not configured (no CODELOOP_{name.upper()}_* token)"))
            continue
        try:
            results.append(Result(name, "ok", check()))
        except Problem as exc:
            results.append(Result(name, "FAIL", str(exc)))
        except Advice as exc:
            results.append(Result(name, "warn", str(exc)))
    return results


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(CHECKS[1:])}")
    parser.add_argument("--quiet", "-q", action="store_true", help="print problems only (for healthchecks)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per network check (default 5)")


def main(args: argparse.Namespace) -> int:
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(only) - set(CHECKS))
    if unknown:
        print(f"codeloop doctor: unknown check {', '.join(unknown)} (choose from {', '.join(CHECKS[1:])})")
        return 2
    results = run_checks(only, args.timeout)
    failed = [r for r in results if r.status == "FAIL"]
    for result in results:
        if not args.quiet or result.status in ("FAIL", "warn"):
            print(result.line(), flush=True)
    if not args.quiet:
        print(f"{len(failed)} problem(s)." if failed else "All checks passed.")
    return 1 if failed else 0
