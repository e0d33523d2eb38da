"""The deploy tests run on a host that has python:3.12-slim instead of codeloop/base:bookworm."""

from __future__ import annotations

import pytest

from tests.deploy.images import base_image


def test_either_base_image_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CODELOOP_TEST_BASE_IMAGE", raising=False)
    assert base_image(lambda image: image == "python:3.12-slim") == "python:3.12-slim"
    assert base_image(lambda image: True) == "codeloop/base:bookworm"
    assert base_image(lambda image: False) == "codeloop/base:bookworm"  # its fixture then fails, naming it
    monkeypatch.setenv("CODELOOP_TEST_BASE_IMAGE", "registry.example/python:3.12")
    assert base_image(lambda image: False) == "registry.example/python:3.12"
