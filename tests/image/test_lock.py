"""requirements/image.txt (tests/image/lock.py) pins what pyproject.toml asks for, with hashes."""

from __future__ import annotations

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.image.lock import BUILD_BACKEND, LOCK, dependencies


def locked() -> dict[str, tuple[str, list[str]]]:
    pins: dict[str, tuple[str, list[str]]] = {}
    for line in LOCK.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        requirement, *hashes = line.split()
        name, version = requirement.split("==")
        pins[canonicalize_name(name)] = (version, hashes)
    return pins


def test_every_dependency_is_pinned_within_its_range_with_a_hash() -> None:
    pins = locked()
    for text in [*dependencies(), BUILD_BACKEND]:
        requirement = Requirement(text)
        version, hashes = pins[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(version, prereleases=True), (text, version)
    for version, hashes in pins.values():
        assert hashes and all(h.startswith("--hash=sha256:") for h in hashes), version
