"""`codeloop sandbox ls` and `clean` against real containers (scoped to this test's own label)."""

from __future__ import annotations

import argparse

import docker
import pytest

from runner import cli
from runner.manager import SandboxManager


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return parser.parse_args(list(argv))


async def test_ls_and_clean(
    manager: SandboxManager,
    docker_client: docker.DockerClient,
    run_id: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    label = f"cli-{run_id}"
    session, _ = await manager.acquire(None, label)
    assert cli.main(parse("ls")) == 0
    listing = capsys.readouterr().out
    assert session.id[:12] in listing and label in listing
    assert cli.main(parse("clean", "--label", label)) == 0
    assert capsys.readouterr().out.strip() == "removed 1 sandbox container(s)"
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(session.id)
