"""The agent's notes beside the kernel: which IPVS services it owns and what it changed.

The nftables table is one record of ownership, but ``nft flush ruleset`` (Debian's stock
``/etc/nftables.conf``, ``systemctl reload nftables``, many firewall tools) wipes it while IPVS
keeps the services; with it gone the agent would take its own services for foreign ones. So
the record is also kept here, in a small JSON file on the node (``/run/ipvs-agent`` by default,
a tmpfs that lives exactly as long as the boot, like the IPVS table), and the agent trusts the
union of both and of what it remembers while it runs: no single piece of host state that other
tools reset decides what the agent owns.

The same file keeps the value each node-wide sysctl had before the agent first changed it, so
``ipvs-agent cleanup`` can put it back, and IPVSNode status can say what was changed from what.

A file written in another network namespace, or before the last boot, describes another table:
it is ignored (``netns`` and ``bootId`` say where and when it was written).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ipvs_agent.host._netns import netns_path
from ipvs_agent.model import AddressFamily, ServiceKey, SyncDaemon, SyncState

log = logging.getLogger(__name__)

DEFAULT_DIR = "/run/ipvs-agent"
FILE_NAME = "state.json"
VERSION = 1
BOOT_ID = "/proc/sys/kernel/random/boot_id"


@dataclass(frozen=True)
class Repair:
    """Host state that someone else changed or removed and the agent put back."""

    #: what kind of state: ``nftables``, ``addresses``
    what: str
    detail: str


@dataclass(frozen=True)
class SysctlNote:
    """A node-wide sysctl the agent changed: the value it wrote and the one it found."""

    value: str
    previous: str


@dataclass(frozen=True)
class State:
    owned: frozenset[ServiceKey] = frozenset()
    masquerade: frozenset[ServiceKey] = frozenset()
    #: Digest of the nftables ruleset the agent last wrote (drift shows as another one).
    digest: str | None = None
    #: Sysctl path under /proc/sys -> what the agent wrote over what.
    sysctls: Mapping[str, SysctlNote] = field(default_factory=dict)
    #: The connection sync daemons the agent started, as it asked for them.
    sync_daemons: tuple[SyncDaemon, ...] = ()

    def with_sysctls(self, changes: Iterable[tuple[str, str, str]]) -> State:
        """Note (path, value, previous) changes; the first previous value of a path stays."""
        notes = dict(self.sysctls)
        for path, value, previous in changes:
            first = notes.get(path)
            notes[path] = SysctlNote(value, first.previous if first else previous)
        return replace(self, sysctls=notes)


def _key_to_json(key: ServiceKey) -> dict[str, Any]:
    return {
        "af": int(key.af),
        "protocol": key.protocol,
        "address": key.address,
        "port": key.port,
        "fwmark": key.fwmark,
    }


def _key_from_json(raw: Mapping[str, Any]) -> ServiceKey:
    return ServiceKey(
        AddressFamily(int(raw["af"])),
        int(raw["protocol"]),
        str(raw["address"]),
        int(raw["port"]),
        int(raw.get("fwmark", 0)),
    )


def encode(state: State, netns: tuple[int, int] | None, boot_id: str) -> str:
    doc = {
        "version": VERSION,
        "netns": list(netns) if netns else None,
        "bootId": boot_id,
        "owned": [_key_to_json(k) for k in sorted(state.owned)],
        "masquerade": [_key_to_json(k) for k in sorted(state.masquerade)],
        "digest": state.digest,
        "sysctls": {
            path: {"value": note.value, "previous": note.previous}
            for path, note in sorted(state.sysctls.items())
        },
        "syncDaemons": [
            {
                "state": int(d.state),
                "interface": d.interface,
                "syncId": d.sync_id,
                "maxLen": d.max_len,
                "group": d.group,
                "port": d.port,
                "ttl": d.ttl,
            }
            for d in state.sync_daemons
        ],
    }
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def decode(text: str, netns: tuple[int, int] | None, boot_id: str) -> State | None:
    """The state in ``text``, or None when it was written elsewhere, earlier or unreadably."""
    try:
        doc = json.loads(text)
        if doc.get("version") != VERSION:
            return None
        written_in = tuple(doc["netns"]) if doc.get("netns") else None
        if netns is not None and written_in != netns:
            return None
        if boot_id and doc.get("bootId") != boot_id:
            return None
        return State(
            frozenset(_key_from_json(k) for k in doc.get("owned") or ()),
            frozenset(_key_from_json(k) for k in doc.get("masquerade") or ()),
            doc.get("digest"),
            {
                str(path): SysctlNote(str(note["value"]), str(note["previous"]))
                for path, note in (doc.get("sysctls") or {}).items()
            },
            tuple(
                SyncDaemon(
                    SyncState(int(d["state"])),
                    str(d["interface"]),
                    int(d.get("syncId", 0)),
                    int(d.get("maxLen", 0)),
                    str(d.get("group", "")),
                    int(d.get("port", 0)),
                    int(d.get("ttl", 0)),
                )
                for d in doc.get("syncDaemons") or ()
            ),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def netns_identity(netns: str | None) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the network namespace the agent works in."""
    path = netns_path(netns) if netns is not None else "/proc/self/ns/net"
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def boot_id() -> str:
    try:
        return Path(BOOT_ID).read_text().strip()
    except OSError:
        return ""


class StateFile:
    """``<directory>/state.json``, written atomically (a rename), read leniently.

    ``directory`` None keeps the state in memory only (``ipvs-agent plan``, tests).
    """

    def __init__(self, directory: str | None = DEFAULT_DIR, *, netns: str | None = None) -> None:
        self.path = Path(directory) / FILE_NAME if directory else None
        self._netns = netns_identity(netns)
        self._boot = boot_id()
        self._cached: State | None = None
        #: The text last read or written and what it says: a pass reads the file up to three
        #: times, and decoding thousands of keys each time cost seconds under emulation.
        self._known: tuple[str, State | None] | None = None

    def load(self) -> State:
        """What the file says (empty when it is missing, foreign or unreadable)."""
        if self.path is None:
            return self._cached or State()
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return State()
        except OSError as error:
            log.warning("cannot read %s: %s", self.path, error)
            return self._cached or State()
        if self._known is not None and self._known[0] == text:
            found = self._known[1]
        else:
            found = decode(text, self._netns, self._boot)
            self._known = (text, found)
        if found is None:
            log.warning("ignoring %s: written in another network namespace or boot", self.path)
            return State()
        return found

    def save(self, state: State) -> None:
        """Replace the file; an unwritable directory is logged, never fatal."""
        self._cached = state
        if self.path is None:
            return
        text = encode(state, self._netns, self._boot)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".state-", dir=self.path.parent)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.replace(tmp, self.path)
            self._known = (text, state)
        except OSError as error:
            log.warning("cannot write %s: %s", self.path, error)
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)

    def remove(self) -> bool:
        """Delete the file (uninstall); True if it existed."""
        self._cached = None
        if self.path is None:
            return False
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True
