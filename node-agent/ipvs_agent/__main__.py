"""Command line of the node agent (``ipvs-agent``).

Only offline validation exists so far; reconciling the kernel arrives with the agent itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ipvs_agent import __version__
from ipvs_api import InvalidObject, constants, load


def validate_files(paths: Sequence[Path]) -> int:
    """Check every ipvs.io object in the files with the API's own schema and rules."""
    failures = 0
    for obj in load.read_manifests(paths):
        if not str(obj.get("apiVersion", "")).startswith(constants.GROUP + "/"):
            continue
        kind = obj.get("kind")
        name = (obj.get("metadata") or {}).get("name", "?")
        try:
            if kind == constants.VIRTUAL_SERVER:
                obj.setdefault("metadata", {}).setdefault("namespace", "default")
                load.virtual_server(obj)
            elif kind == constants.ADDRESS_POOL:
                load.address_pool(obj)
            else:
                continue
        except InvalidObject as exc:
            failures += 1
            print(f"{kind}/{name}: invalid", file=sys.stderr)
            for err in exc.errors:
                print(f"  {err}", file=sys.stderr)
        else:
            print(f"{kind}/{name}: valid")
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ipvs-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    val = sub.add_parser(
        "validate", help="validate VirtualServer and AddressPool manifests offline"
    )
    val.add_argument("-f", "--filename", type=Path, nargs="+", action="extend", required=True)
    args = parser.parse_args(argv)
    if args.command == "validate":
        return validate_files(args.filename)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
