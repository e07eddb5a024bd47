"""IPVSKernel: the kernel's IPVS table over generic netlink, batched.

pyroute2's GenericNetlinkSocket creates the socket (in another netns if asked), binds it and
resolves the "IPVS" family; after that we keep only a duplicate of its file descriptor and do
our own framing (kernel.netlink), because pyroute2's per-message request machinery and generic
NLA parsing cost far more than the kernel work under a large table.

Batching: ``apply`` writes up to ``batch_size`` requests per send(). Only the last request of a
batch asks for an ack; netlink answers every *failed* request with an error ack regardless of
NLM_F_ACK, in order, so each earlier request without an error reply before the final ack has
succeeded. That saves one recv() per op (the kernel runs the whole batch inside send()).

Dumps: one GET_SERVICE dump, then one GET_DEST dump per service. They cannot be pipelined:
a netlink socket runs one dump at a time (a second request while one is open gets EBUSY) and
the kernel writes each chunk synchronously inside our send()/recv(). What is left to save is
Python work, so a dump (1) decodes dests through layouts learned from the kernel's fixed
attribute order (kernel.netlink.DumpDecoder), (2) pauses the cyclic GC, and (3) recognises
what did not change since the last dump by digest and hands back the last dump's objects
(see _Seen), so the agent's periodic resync of an idle table decodes almost nothing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, NamedTuple, Self

from ipvs_agent.heap import collector_paused
from ipvs_agent.kernel import (
    PRELOAD_SCHEDULERS,
    KernelError,
    OpResult,
    apply_in_rounds,
    describe_error,
)
from ipvs_agent.kernel import netlink as nl
from ipvs_agent.model import (
    DesiredTable,
    Dest,
    DestKey,
    KernelInfo,
    ObservedDest,
    ObservedService,
    ObservedTable,
    Service,
    ServiceKey,
    ServiceStats,
    SyncDaemon,
    SyncState,
    Timeouts,
)
from ipvs_agent.ops import Op

SOL_NETLINK: Final = 270
NETLINK_CAP_ACK: Final = 10  # error acks without the echoed request
NETLINK_EXT_ACK: Final = 11  # error acks with the kernel's message, when it gives one
SO_RCVBUFFORCE: Final = 33
RECV_BUFFER: Final = 1 << 16  # netlink caps a dump chunk at 32 KiB
SOCKET_BUFFER: Final = 8 << 20  # room for the error acks of a whole failed batch
DEFAULT_BATCH: Final = 256
DEFAULT_TIMEOUT: Final = 30.0


class IPVSKernel:
    """The IPVS table of one network namespace, as ``kernel.Kernel`` describes it.

    ``netns`` names a namespace (``/run/netns/<name>`` or a path) to work in; None is the
    caller's own. Each call is bounded by ``timeout`` seconds of silence from the kernel.
    """

    def __init__(
        self,
        netns: str | None = None,
        *,
        batch_size: int = DEFAULT_BATCH,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._family, self._sock = _open(netns)
        self._sock.settimeout(timeout)
        for option, value in ((NETLINK_CAP_ACK, 1), (NETLINK_EXT_ACK, 1)):
            with contextlib.suppress(OSError):  # older kernels: longer acks, no messages
                self._sock.setsockopt(SOL_NETLINK, option, value)
        for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
                break
            except OSError:
                continue  # no CAP_NET_ADMIN for FORCE: take what rmem_max allows
        self._batch = batch_size
        self._buf = bytearray(RECV_BUFFER)
        self._seq = 0
        #: decodes dumps; its readers count fast-path hits (for tests and benchmarks)
        self.decoder = nl.DumpDecoder()
        self._last: ObservedTable = {}
        self._seen: dict[bytes, _Seen] = {}
        self._lock = threading.Lock()
        #: The schedulers :meth:`info` found (modules are global: any namespace sees them).
        self._schedulers: tuple[str, ...] | None = None

    # --- Kernel protocol ------------------------------------------------------------------

    def dump(self, expected: DesiredTable | None = None) -> ObservedTable:
        """The whole table. What did not change since the last dump is that dump's own
        objects (the two tables share them), found without decoding: see _Seen. A dest
        decoded anew that equals ``expected``'s is that Dest object itself."""
        with self._lock, collector_paused():
            seq = self._next_seq()
            self._send(nl.message(self._family, nl.Cmd.GET_SERVICE,
                                  nl.NLM_F_REQUEST | nl.NLM_F_DUMP, seq))  # fmt: skip
            replies = self._collect(seq, "GET_SERVICE")
            table: dict[ServiceKey, ObservedService] = {}
            seen: dict[bytes, _Seen] = {}
            for chunk in replies:
                for start, end in _spans(chunk):
                    fingerprint = _digest(memoryview(chunk)[start + nl.NLMSG_HDR.size : end])
                    observed, record = self._dump_service(chunk, start, end, fingerprint, expected)
                    table[observed.service.key] = observed
                    seen[fingerprint] = record
            self._last, self._seen = table, seen
            return table

    def read(
        self, keys: Collection[ServiceKey], expected: DesiredTable | None = None
    ) -> ObservedTable:
        """Only these services: a GET_SERVICE and a GET_DEST dump each. Not remembered for
        the next dump (its shortcut compares with the last whole table)."""
        with self._lock, collector_paused():
            table: dict[ServiceKey, ObservedService] = {}
            for key in keys:
                found = self._get_service(key)
                if found is None:
                    continue
                service, stats = found
                request = nl.encode_dest_dump(self._family, self._next_seq(), key)
                like = _expected_dests(expected, key)
                dests, _, _ = self._dump_dests(key, request, None, b"", like)
                table[key] = ObservedService(service, dests, stats)
            return table

    def _get_service(self, key: ServiceKey) -> tuple[Service, ServiceStats] | None:
        """One service by its key; None if the kernel has none (ESRCH)."""
        seq = self._next_seq()
        payload = nl.nested(nl.CmdAttr.SERVICE, nl.encode_service_key(key))
        self._send(nl.message(self._family, nl.Cmd.GET_SERVICE, nl.NLM_F_REQUEST, seq, payload))
        found: list[tuple[Service, ServiceStats]] = []

        def on_data(header: nl.Header) -> bool:
            found.append(nl.decode_service_message(self._buf, header))
            return True

        def on_error(header: nl.Header) -> bool:
            code, text = nl.decode_error(self._buf, header)
            if code and code != errno.ESRCH:
                raise KernelError(code, f"GET_SERVICE {key}: {text or os.strerror(code)}")
            return True

        self._receive(seq, on_data, on_error)
        return found[0] if found else None

    def apply(self, ops: Sequence[Op]) -> list[OpResult]:
        with self._lock:
            return apply_in_rounds(ops, lambda indices: self._apply_indices(ops, indices))

    def _apply_indices(self, ops: Sequence[Op], indices: Sequence[int]) -> list[OpResult]:
        chosen = [ops[i] for i in indices]
        results: list[OpResult | None] = [None] * len(chosen)
        for start in range(0, len(chosen), self._batch):
            end = min(start + self._batch, len(chosen))
            self._apply_batch(chosen, range(start, end), results)
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    def info(self) -> KernelInfo:
        with self._lock:
            header, data = self._request(nl.Cmd.GET_INFO)
            version, table_size = nl.decode_info(data, header)
        release = os.uname().release
        schedulers, tunnels = probe_modules(release)
        self._schedulers = schedulers
        return KernelInfo(version, table_size, release, schedulers, tunnels, self.unloaded())

    def unloaded(self) -> tuple[str, ...]:
        release = os.uname().release
        if self._schedulers is None:
            self._schedulers = probe_modules(release)[0]
        return unloaded_schedulers(self._schedulers, release)

    def set_timeouts(self, timeouts: Timeouts) -> None:
        with self._lock:
            seq = self._next_seq()
            try:
                data = nl.encode_set_timeouts(self._family, seq, timeouts)
            except nl.CodecError as error:
                raise KernelError(error.errno, str(error)) from None
            self._send(data)

            def on_error(header: nl.Header) -> bool:
                code, text = nl.decode_error(self._buf, header)
                if code:
                    raise KernelError(code, text or f"SET_CONFIG: {os.strerror(code)}")
                return True

            self._receive(seq, lambda _header: False, on_error)

    def get_timeouts(self) -> Timeouts:
        with self._lock:
            header, data = self._request(nl.Cmd.GET_CONFIG)
            return nl.decode_timeouts(data, header)

    def daemons(self) -> tuple[SyncDaemon, ...]:
        with self._lock:
            seq = self._next_seq()
            self._send(nl.encode_daemon_dump(self._family, seq))
            found: list[SyncDaemon] = []
            for chunk in self._collect(seq, "GET_DAEMON"):
                for header in nl.messages(chunk):
                    daemon = nl.decode_daemon(chunk, header)
                    if daemon is not None:
                        found.append(daemon)
            return tuple(found)

    def start_daemon(self, daemon: SyncDaemon) -> None:
        with self._lock:
            seq = self._next_seq()
            try:
                data = nl.encode_new_daemon(self._family, seq, daemon)
            except nl.CodecError as error:
                raise KernelError(error.errno, str(error)) from None
            self._send(data)
            self._receive(seq, lambda _header: False, self._ack_or_raise("NEW_DAEMON"))

    def stop_daemon(self, state: SyncState) -> None:
        with self._lock:
            seq = self._next_seq()
            self._send(nl.encode_del_daemon(self._family, seq, state))
            self._receive(seq, lambda _header: False, self._ack_or_raise("DEL_DAEMON"))

    def _ack_or_raise(self, what: str) -> Callable[[nl.Header], bool]:
        def on_error(header: nl.Header) -> bool:
            code, text = nl.decode_error(self._buf, header)
            if code:
                raise KernelError(code, f"{what}: {text or os.strerror(code)}")
            return True

        return on_error

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- batches ----------------------------------------------------------------------------

    def _apply_batch(
        self, ops: Sequence[Op], indices: range, results: list[OpResult | None]
    ) -> None:
        pending: dict[int, int] = {}  # seq -> index into ops
        encoded: list[tuple[int, nl.Cmd, bytes]] = []
        for index in indices:
            op = ops[index]
            try:
                cmd, payload = nl.encode_op_payload(op)
            except nl.CodecError as error:
                results[index] = OpResult(op, error.errno, str(error))
                continue
            seq = self._next_seq()
            pending[seq] = index
            encoded.append((seq, cmd, payload))
        if not encoded:
            return
        last = encoded[-1][0]
        data = b"".join(
            nl.message(
                self._family, cmd, nl.NLM_F_REQUEST | (nl.NLM_F_ACK if seq == last else 0),
                seq, payload,
            )
            for seq, cmd, payload in encoded
        )  # fmt: skip
        replies: dict[int, tuple[int, str]] = {}
        lost: OSError | None = None
        try:
            self._send(data)

            def on_error(header: nl.Header) -> bool:
                if header.seq in pending:
                    replies[header.seq] = nl.decode_error(self._buf, header)
                return header.seq == last

            self._receive(last, lambda _header: False, on_error, errors_of=pending)
        except OSError as error:
            lost = error
        for seq, index in pending.items():
            op = ops[index]
            if seq in replies:
                code, text = replies[seq]
            elif lost is not None:
                code = lost.errno or errno.EIO
                text = f"no answer from the kernel ({lost}); state unknown until the next dump"
            else:
                code, text = 0, ""
            results[index] = OpResult(op, code, describe_error(op, code, text))

    # --- dumps ------------------------------------------------------------------------------

    def _dump_service(
        self,
        chunk: bytearray,
        start: int,
        end: int,
        fingerprint: bytes,
        expected: DesiredTable | None,
    ) -> tuple[ObservedService, _Seen]:
        """One service of the GET_SERVICE reply at ``chunk[start:end]``, with its dests."""
        seen = self._seen.get(fingerprint)
        if seen is not None:  # byte for byte the service (and counters) of the last dump
            before: ObservedService | None = seen.observed
            service, stats, request, digest = (
                seen.observed.service,
                seen.observed.stats,
                seen.request,
                seen.dests,
            )
        else:
            header = nl.Header(0, 0, 0, start + nl.NLMSG_HDR.size, end)
            service, stats = self.decoder.service(chunk, header)
            before = self._last.get(service.key)
            if before is not None and before.service == service:
                service = before.service
            request, digest = nl.encode_dest_dump(self._family, self._next_seq(), service.key), b""
        like = _expected_dests(expected, service.key)
        dests, digest, unchanged = self._dump_dests(service.key, request, before, digest, like)
        if unchanged and before is not None and before.service is service:
            observed = (
                before if before.stats == stats else ObservedService(service, before.dests, stats)
            )
        else:
            observed = ObservedService(service, dests, stats)
        return observed, _Seen(observed, request, digest)

    def _dump_dests(
        self,
        key: ServiceKey,
        request: bytes,
        before: ObservedService | None,
        digest: bytes,
        expected: Mapping[DestKey, Dest] | None = None,
    ) -> tuple[Mapping[DestKey, ObservedDest], bytes, bool]:
        """The dests of one service, the digest of the reply, and whether they are exactly
        ``before``'s.

        ``request`` keeps its sequence number from dump to dump, so an unchanged reply is
        byte for byte the same: when its digest equals ``digest`` (the last dump's),
        ``before.dests`` is the answer and nothing is decoded. Otherwise each dest is
        decoded, reusing the ``expected`` Dest equal to it, and the last dump's object in
        its place when that one is still right.
        """
        self._send(request)
        chunks = self._collect(nl.NLMSG_HDR.unpack_from(request)[3], f"GET_DEST {key}")
        fingerprint = _digest(*chunks)
        if before is not None and fingerprint == digest:
            return before.dests, fingerprint, True
        earlier = list(before.dests.values()) if before is not None else []
        like = {(k.address, k.port): d for k, d in expected.items()} if expected else None
        found: dict[DestKey, ObservedDest] = {}
        reused = 0
        af = int(key.af)
        read = self.decoder.dests.read_at
        build = nl.observed_dest
        unpack = nl.NLMSG_HDR.unpack_from
        for chunk in chunks:  # messages checked by _collect; walked inline, this runs per dest
            start, size = 0, len(chunk)
            while start < size:
                length = unpack(chunk, start)[0]
                index = len(found)
                previous = earlier[index] if index < len(earlier) else None
                values = read(chunk, start, length)
                if values is None:
                    header = nl.Header(0, 0, 0, start + nl.NLMSG_HDR.size, start + length)
                    observed = nl.decode_dest_message(chunk, header, af)
                else:
                    observed = build(af, *values, previous=previous, like=like)
                    reused += observed is previous
                found[observed.dest.key] = observed
                start += (length + 3) & ~3
        return found, fingerprint, reused == len(earlier) == len(found)

    def _collect(self, seq: int, what: str) -> list[bytearray]:
        """The data messages of the reply to dump ``seq``, as received (datagram by
        datagram), up to its NLMSG_DONE."""
        chunks: list[bytearray] = []
        unpack = nl.NLMSG_HDR.unpack_from
        while True:
            size = self._recv()
            data = self._buf[:size]
            off = 0
            while off + nl.NLMSG_HDR.size <= size:
                length, kind, flags, got, _pid = unpack(data, off)
                if length < nl.NLMSG_HDR.size or off + length > size:
                    raise KernelError(errno.EPROTO, f"{what}: truncated message")
                if got != seq:
                    break  # a datagram left over from a call that timed out
                start, off = off, off + ((length + 3) & ~3)
                if kind == nl.NLMSG_DONE:
                    if start:
                        chunks.append(data[:start])
                    return chunks
                if kind == nl.NLMSG_ERROR:
                    header = nl.Header(kind, flags, got, start + nl.NLMSG_HDR.size, start + length)
                    code, text = nl.decode_error(data, header)
                    if not code:
                        raise KernelError(errno.EPROTO, f"{what}: acked instead of answered")
                    raise KernelError(code, f"{what}: {text or os.strerror(code)}")
            else:
                chunks.append(data)

    def _dump_error(self, what: str) -> Callable[[nl.Header], bool]:
        def on_error(header: nl.Header) -> bool:
            code, text = nl.decode_error(self._buf, header)
            if code:
                raise KernelError(code, f"{what}: {text or os.strerror(code)}")
            return True

        return on_error

    # --- transport --------------------------------------------------------------------------

    def _request(self, cmd: nl.Cmd) -> tuple[nl.Header, bytes]:
        """A get without attributes; returns the reply (copied out of the receive buffer)."""
        seq = self._next_seq()
        self._send(nl.message(self._family, cmd, nl.NLM_F_REQUEST, seq))
        reply: list[tuple[nl.Header, bytes]] = []

        def on_data(header: nl.Header) -> bool:
            data = bytes(self._buf[: header.end])
            reply.append((header, data))
            return True

        self._receive(seq, on_data, self._dump_error(nl.Cmd(cmd).name))
        if not reply:
            raise KernelError(errno.EPROTO, f"{nl.Cmd(cmd).name}: empty reply")
        return reply[0]

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def _send(self, data: bytes) -> None:
        try:
            self._sock.send(data)
        except OSError as error:
            raise KernelError(error.errno or errno.EIO, f"netlink send: {error}") from error

    def _recv(self) -> int:
        """One datagram into the receive buffer; its size."""
        try:
            size = self._sock.recv_into(self._buf, 0, socket.MSG_TRUNC)
        except TimeoutError:
            raise KernelError(errno.ETIMEDOUT, "the kernel did not answer in time") from None
        except OSError as error:
            raise KernelError(error.errno or errno.EIO, f"netlink receive: {error}") from error
        if size > len(self._buf):
            raise KernelError(errno.EMSGSIZE, "netlink reply larger than the receive buffer")
        return size

    def _receive(
        self,
        seq: int,
        on_data: Callable[[nl.Header], bool],
        on_error: Callable[[nl.Header], bool],
        errors_of: Iterable[int] = (),
    ) -> None:
        """Read replies until a handler says done or NLMSG_DONE for ``seq`` arrives.

        Replies to other sequence numbers (left over from a call that timed out) are
        dropped, except error acks for ``errors_of`` (the requests of a batch).
        """
        wanted = set(errors_of)
        wanted.add(seq)
        buf = self._buf
        while True:
            for header in nl.messages(buf, self._recv()):
                if header.seq not in wanted:
                    continue
                if header.type == nl.NLMSG_ERROR:
                    if on_error(header):
                        return
                elif header.type == nl.NLMSG_DONE:
                    if header.seq == seq:
                        return
                elif header.seq == seq and on_data(header):
                    return


class _Seen(NamedTuple):
    """A service as the last dump saw it, found again by the digest of its GET_SERVICE
    message (settings and counters): its table entry, the GET_DEST request naming it (with
    a sequence number it keeps) and the digest of that request's reply."""

    observed: ObservedService
    request: bytes
    dests: bytes


def _digest(*parts: bytes | bytearray | memoryview) -> bytes:
    """128-bit BLAKE2b: equal digests stand for equal bytes (collisions: 2**-64 odds at the
    birthday bound, far below any hardware error rate)."""
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part)
    return digest.digest()


def _spans(chunk: bytearray) -> Iterator[tuple[int, int]]:
    """(start, end) of each message in a chunk _collect kept (already checked)."""
    off, size = 0, len(chunk)
    unpack = nl.NLMSG_HDR.unpack_from
    while off < size:
        length = unpack(chunk, off)[0]
        yield off, off + length
        off += (length + 3) & ~3


def _open(netns: str | None) -> tuple[int, socket.socket]:
    """Resolve the IPVS family with pyroute2 and keep a duplicate of its socket."""
    from pyroute2.netlink import genlmsg
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.generic import GenericNetlinkSocket

    try:
        # flags=0: open an existing netns, never create one
        gnl = GenericNetlinkSocket(netns=netns, flags=0) if netns else GenericNetlinkSocket()
    except OSError as error:
        raise KernelError(error.errno or errno.EIO, f"netlink socket: {error}") from error
    try:
        gnl.bind(nl.GENL_NAME, genlmsg)
        family = int(gnl.prid)
        fd = os.dup(gnl.fileno())
    except NetlinkError as error:
        code = error.code or errno.EIO
        hint = " (is the ip_vs module loaded?)" if code == errno.ENOENT else ""
        raise KernelError(code, f"generic netlink family IPVS not found{hint}") from error
    finally:
        gnl.close()
    return family, socket.socket(fileno=fd)


# --- module probing -------------------------------------------------------------------------

#: Schedulers ip_vs has had, in the order ipvsadm(8) lists them; new ones are found on disk.
KNOWN_SCHEDULERS: Final = (
    "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos",
)  # fmt: skip
#: ip_vs_* modules that are not schedulers.
NOT_SCHEDULERS: Final = frozenset({"ftp", "pe_sip"})
#: Tunnel type -> the module that handles it at the receiving end (GUE is fou). ip_vs on the
#: director writes all three headers itself (ip_vs_xmit.c); a node is offered a type when its
#: kernel also has the module, as a real server of the same cluster will need it.
TUNNEL_MODULES: Final = (("ipip", "ipip"), ("gue", "fou"), ("gre", "ip_gre"))


def _expected_dests(
    expected: DesiredTable | None, key: ServiceKey
) -> Mapping[DestKey, Dest] | None:
    """The dests a dump may lend (``Kernel.dump``'s ``expected``) for one service."""
    like = expected.get(key) if expected is not None else None
    return like.dests if like is not None else None


def _module_name(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def loaded_modules(release: str, root: Path = Path("/")) -> frozenset[str]:
    """Modules in the kernel now: loaded (/proc/modules, /sys/module) or built in
    (modules.builtin of /lib/modules/<release>); missing files count as empty."""
    names: set[str] = set()
    with contextlib.suppress(OSError):
        for line in (root / "proc/modules").read_text().splitlines():
            names.add(line.split(" ", 1)[0])
    with contextlib.suppress(OSError):
        names.update(entry.name for entry in (root / "sys/module").iterdir())
    names.update(_listed(root / "lib/modules" / release / "modules.builtin", None))
    return frozenset(names)


def _listed(listing: Path, split: str | None) -> set[str]:
    """Module names in a modules.dep (``split`` ":") or modules.builtin listing."""
    try:
        text = listing.read_text()
    except OSError:
        return set()
    names = set()
    for line in text.splitlines():
        path = line.split(split, 1)[0] if split else line
        if path.strip():
            names.add(_module_name(path.strip()))
    return names


def available_modules(release: str, root: Path = Path("/")) -> frozenset[str]:
    """Modules that are loaded, built in, or installed for ``release``.

    Reads /proc/modules, /sys/module and the modules.dep / modules.builtin of
    /lib/modules/<release>; missing files count as empty (a container may lack them).
    """
    installed = _listed(root / "lib/modules" / release / "modules.dep", ":")
    return loaded_modules(release, root) | installed


def unloaded_schedulers(
    schedulers: Iterable[str], release: str, root: Path = Path("/")
) -> tuple[str, ...]:
    """Those of ``schedulers`` in PRELOAD_SCHEDULERS whose module is not in the kernel now.
    Every pass asks, so a loaded module costs one stat (its /sys/module directory)."""
    sysfs = root / "sys/module"
    wanted = [
        s for s in schedulers if s in PRELOAD_SCHEDULERS and not (sysfs / f"ip_vs_{s}").is_dir()
    ]
    if not wanted:
        return ()
    loaded = loaded_modules(release, root)
    return tuple(s for s in wanted if f"ip_vs_{s}" not in loaded)


def probe_modules(release: str, root: Path = Path("/")) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(schedulers, tunnel types) this kernel has or can load."""
    modules = available_modules(release, root)
    found = {m.removeprefix("ip_vs_") for m in modules if m.startswith("ip_vs_")}
    found -= NOT_SCHEDULERS
    order = {name: i for i, name in enumerate(KNOWN_SCHEDULERS)}
    schedulers = tuple(sorted(found, key=lambda s: (order.get(s, len(order)), s)))
    tunnels = tuple(kind for kind, module in TUNNEL_MODULES if module in modules)
    return schedulers, tunnels
