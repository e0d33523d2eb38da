"""Which local base image the deploy tests build on.

scripts/bootstrap builds the sandbox image on ``python:3.12-slim`` when the engine has it and
only otherwise makes ``codeloop/base:bookworm`` from Debian's mirror, so a machine may hold either
one. Tests take ``CODELOOP_TEST_BASE_IMAGE`` when set, else whichever of the two is there (the
Debian one first: it is what CI builds), and fail loudly, naming both, when neither is.
"""

from __future__ import annotations

import os
from collections.abc import Callable

CANDIDATES = ("codeloop/base:bookworm", "python:3.12-slim")


def _on_engine(image: str) -> bool:
    import docker

    try:
        client = docker.from_env()
    except Exception:
        return False
    try:
        client.images.get(image)
        return True
    except Exception:
        return False
    finally:
        client.close()


def base_image(present: Callable[[str], bool] = _on_engine) -> str:
    chosen = os.environ.get("CODELOOP_TEST_BASE_IMAGE")
    if chosen:
        return chosen
    for image in CANDIDATES:
        if present(image):
            return image
    return CANDIDATES[0]  # the fixture that needs it fails and names it
