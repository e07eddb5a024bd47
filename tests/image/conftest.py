"""Fixtures of the image tests: the image as CI builds it, and its unpacked root filesystem.

The image is built by tests/image/build.sh (cached; tests/setup.sh runs it first, so here it
is normally a check of its inputs). A machine that cannot build it fails these tests with the
reason, never skips them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.image.oci import Image, ImageError, build_image, unpack


@pytest.fixture(scope="session")
def image() -> Image:
    failure = ""
    try:
        return build_image()
    except ImageError as error:
        failure = str(error)
    pytest.fail(f"the image could not be built (tests/image/build.sh):\n{failure}", False)


@pytest.fixture(scope="session")
def rootfs(image: Image) -> Path:
    failure = ""
    try:
        return unpack(image)
    except ImageError as error:
        failure = str(error)
    pytest.fail(f"the image could not be unpacked:\n{failure}", False)


@pytest.fixture(autouse=True)
def _apiserver_for_marked_tests() -> None:
    """Overrides the shared plugin's fixture: these tests bring their own beds."""
