"""``ipvs-agent cleanup``: remove exactly what the agent created on a node, nothing else.

What the agent created is what it recorded: the IPVS services in its ownership record (the
nftables table and the state file), its dummy device with the VIPs, its nftables tables, the
real-server setup it made in the node's namespace and in pods' (found by its marks), the
connection sync daemons it started, and the node-wide sysctls it changed (each put back to the
value it found, unless someone changed it again since). Services, devices, tables and settings
of other programs stay as they are.

The in-cluster agent runs the same cleanup when its DaemonSet is deleted (``helm uninstall``),
and only then: a restart or rollout leaves the kernel table in place, so traffic keeps flowing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ipvs_agent.kernel import Kernel
from ipvs_agent.ops import Op, OpKind
from ipvs_agent.syncd import SyncDaemons
from ipvs_agent.system import LinuxHost

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What the cleanup removed or restored (one line each) and what it could not."""

    done: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def cleanup(kernel: Kernel, host: LinuxHost) -> Report:
    """Undo the agent on this node; every step runs even if an earlier one failed."""
    report = Report()
    recorded = host.recorded()
    table = kernel.dump()
    mine = [table[key].service for key in sorted(recorded.owned) if key in table]
    for result in kernel.apply([Op(OpKind.DEL_SERVICE, service) for service in mine]):
        if result.ok:
            report.done.append(f"deleted virtual service {result.op.service.key}")
        else:
            report.errors.append(f"{result.op}: {result.message}")
    for step in (host.remove_addresses, host.remove_tables, host.clear_real_servers):
        try:
            report.done += step()
        except Exception as error:  # one step's failure must not keep the others from running
            report.errors.append(f"{step.__name__}: {error}")
    try:
        report.done += SyncDaemons(None, host.state).stop_all(kernel)
    except Exception as error:
        report.errors.append(f"sync daemons: {error}")
    try:
        done, left = host.restore_sysctls()
        report.done += done
        report.done += left
    except Exception as error:
        report.errors.append(f"restore_sysctls: {error}")
    if not report.errors:
        host.state.remove()
    for line in report.done:
        log.info("cleanup: %s", line)
    for line in report.errors:
        log.error("cleanup: %s", line)
    return report
