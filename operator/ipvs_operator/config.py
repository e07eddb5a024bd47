"""Settings of ``ipvs-operator run``: command-line flags, each with an environment default.

Environment variables let the chart set everything without templating arguments; flags win
when both are given.
"""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Config:
    default_load_balancer: bool = False
    namespaces: tuple[str, ...] = ()
    leader_election: bool = True
    lease_namespace: str = ""
    agents_namespace: str = ""
    lease_name: str = "ipvs-operator"
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    identity: str = ""
    workers: int = 8
    health_port: int = 8080
    verbose: bool = False


def add_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] = os.environ) -> None:
    d = Config()
    parser.add_argument(
        "--default-load-balancer",
        action=argparse.BooleanOptionalAction,
        default=_env_bool(env, "IPVS_DEFAULT_LOAD_BALANCER", d.default_load_balancer),
        help="also serve LoadBalancer Services without a loadBalancerClass "
        "[env IPVS_DEFAULT_LOAD_BALANCER]",
    )
    parser.add_argument(
        "--namespace",
        dest="namespaces",
        action="append",
        default=[n for n in env.get("IPVS_NAMESPACES", "").split(",") if n],
        help="serve only these namespaces (glob patterns allowed, repeatable); "
        "default: the whole cluster [env IPVS_NAMESPACES, comma-separated]",
    )
    parser.add_argument(
        "--leader-election",
        action=argparse.BooleanOptionalAction,
        default=_env_bool(env, "IPVS_LEADER_ELECTION", d.leader_election),
        help="hold a Lease so that only one replica acts [env IPVS_LEADER_ELECTION]",
    )
    parser.add_argument(
        "--lease-namespace",
        default=env.get("IPVS_LEASE_NAMESPACE") or env.get("POD_NAMESPACE", ""),
        help="namespace of the Lease (default: the pod's) [env IPVS_LEASE_NAMESPACE]",
    )
    parser.add_argument(
        "--agents-namespace",
        default=env.get("IPVS_AGENTS_NAMESPACE") or env.get("POD_NAMESPACE", ""),
        help="namespace of the node agents' Leases, which tell which agents are alive "
        "(default: the pod's, else the Lease's) [env IPVS_AGENTS_NAMESPACE]",
    )
    parser.add_argument("--lease-name", default=env.get("IPVS_LEASE_NAME", d.lease_name))
    parser.add_argument(
        "--lease-duration",
        type=float,
        default=float(env.get("IPVS_LEASE_DURATION", d.lease_duration)),
        help="seconds a standby waits after the last renewal before taking over",
    )
    parser.add_argument(
        "--renew-deadline",
        type=float,
        default=float(env.get("IPVS_RENEW_DEADLINE", d.renew_deadline)),
        help="seconds the leader keeps acting without a successful renewal",
    )
    parser.add_argument(
        "--retry-period",
        type=float,
        default=float(env.get("IPVS_RETRY_PERIOD", d.retry_period)),
        help="seconds between renewals (and between a standby's attempts)",
    )
    parser.add_argument(
        "--identity",
        default=env.get("POD_NAME", ""),
        help="this replica's name in the Lease (default: pod name or hostname, plus a suffix)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(env.get("IPVS_WORKERS", d.workers)),
        help="reconciles in flight at once",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=int(env.get("IPVS_HEALTH_PORT", d.health_port)),
        help="port of /healthz (0: none) [env IPVS_HEALTH_PORT]",
    )
    parser.add_argument("-v", "--verbose", action="store_true")


def from_arguments(args: argparse.Namespace) -> Config:
    identity = args.identity or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    return Config(
        default_load_balancer=args.default_load_balancer,
        namespaces=tuple(args.namespaces),
        leader_election=args.leader_election,
        lease_namespace=args.lease_namespace,
        agents_namespace=args.agents_namespace,
        lease_name=args.lease_name,
        lease_duration=args.lease_duration,
        renew_deadline=args.renew_deadline,
        retry_period=args.retry_period,
        identity=identity,
        workers=max(1, args.workers),
        health_port=args.health_port,
        verbose=args.verbose,
    )
