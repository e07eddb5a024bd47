"""Command line of the operator (``ipvs-operator``).

``ipvs-operator run`` starts the controller (kopf, behind a Lease); ``ipvs-operator crds``
prints the CRDs it serves (``ipvs-operator crds | kubectl apply -f -``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import yaml

from ipvs_api import schema
from ipvs_operator import __version__, config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ipvs-operator", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("crds", help="print the CustomResourceDefinitions as YAML")
    run = sub.add_parser("run", help="run the operator (leader-elected kopf controller)")
    config.add_arguments(run)
    args = parser.parse_args(argv)
    if args.command == "crds":
        docs = [doc for _, doc in schema.crd_documents()]
        sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
        return 0
    if args.command == "run":
        from ipvs_operator import run as runner  # kopf is imported only to run

        return runner.main(config.from_arguments(args))
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
