"""`codeloop sandbox ls` and `clean` against real containers (scoped to this test's own label)."""

from __future__ import annotations

import argparse
from pathlib import Path

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


def test_build_takes_operator_packages_and_a_requirements_file(tmp_path: Path) -> None:
    extra = tmp_path / "extra.txt"
    extra.write_text("polars==1.0\n")
    args = parse("build", "--base", "codeloop/base:bookworm", "--packages", " duckdb  polars ", "--requirements",
                 str(extra))
    assert cli.build_args(args) == {"BASE": "codeloop/base:bookworm", "PACKAGES": "duckdb polars"}
    context = tmp_path / "context"
    context.mkdir()
    cli._context(context, args.requirements)
    assert (context / "image" / "extra-requirements.txt").read_text() == "polars==1.0\n"
    # the batteries and their pins always go along; the Dockerfile installs all three together
    pins = (context / "image" / "constraints.txt").read_text()
    assert "ipython==" in pins and "pandas==2." in pins
    dockerfile = (context / "Dockerfile").read_text()
    assert "-c /opt/codeloop/constraints.txt -r /opt/codeloop/requirements.txt" in dockerfile
    assert "-r /opt/codeloop/extra-requirements.txt ${PACKAGES}" in dockerfile
    assert cli.build_args(parse("build")) == {}
    assert cli.main(parse("build", "--requirements", str(tmp_path / "missing.txt"), "--tag", "x:y")) == 2
