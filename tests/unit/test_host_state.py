"""The state file's reader remembers the last text it decoded, and only that text."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipvs_agent.host import state as state_module
from ipvs_agent.host.state import State, StateFile
from ipvs_agent.model import AddressFamily, ServiceKey


def key(port: int) -> ServiceKey:
    return ServiceKey(AddressFamily.INET, 6, "192.0.2.1", port)


def test_an_unchanged_file_is_decoded_once_and_an_edit_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[str] = []
    real = state_module.decode

    def counting(text: str, *args: object) -> State | None:
        decoded.append(text)
        return real(text, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(state_module, "decode", counting)
    ours = StateFile(str(tmp_path))
    ours.save(State(owned=frozenset({key(80)})))
    assert ours.load().owned == {key(80)}
    assert ours.load().owned == {key(80)}
    assert decoded == [], "what this reader wrote is known without decoding"
    # Another writer (a restarted agent, an operator's hand) changes the file: read anew.
    StateFile(str(tmp_path)).save(State(owned=frozenset({key(443)})))
    assert ours.load().owned == {key(443)}
    assert ours.load().owned == {key(443)}
    assert len(decoded) == 1
    (tmp_path / state_module.FILE_NAME).write_text("not json")
    assert ours.load() == State()
    assert ours.load() == State()
    assert len(decoded) == 2


def test_what_a_save_remembers_equals_what_the_file_decodes_to(tmp_path: Path) -> None:
    wanted = State(
        owned=frozenset({key(80), ServiceKey.for_fwmark(AddressFamily.INET6, 7)}),
        masquerade=frozenset({key(80)}),
        digest="abc",
    ).with_sysctls([("net/ipv4/vs/conntrack", "1", "0")])
    StateFile(str(tmp_path)).save(wanted)
    assert StateFile(str(tmp_path)).load() == wanted
