"""Command line of the operator (``ipvs-operator``).

So far it prints the CRDs it serves (``ipvs-operator crds | kubectl apply -f -``); the kopf
controller arrives with the operator itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import yaml

from ipvs_api import schema
from ipvs_operator import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ipvs-operator", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("crds", help="print the CustomResourceDefinitions as YAML")
    args = parser.parse_args(argv)
    if args.command == "crds":
        docs = [doc for _, doc in schema.crd_documents()]
        sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
