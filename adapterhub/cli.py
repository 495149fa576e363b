"""`adapterhub ...` on the command line.

    adapterhub plugins [--json]     the installed adapter types, their plugins and hooks
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict

from .plugins import registry


def plugins(as_json: bool) -> int:
    types, failures = registry().listing(), registry().failures()
    if as_json:
        print(json.dumps({"types": [asdict(t) for t in types], "failures": [asdict(f) for f in failures]}, indent=2))
        return 0
    for t in types:
        dist = f"{t.distribution} {t.version}".strip() or "(registered in code)"
        print(f"{t.name:<16} {dist:<24} aliases: {', '.join(t.aliases) or '-':<16} hooks: {', '.join(t.hooks)}")
        if t.description:
            print(f"{'':<16} {t.description}")
    for f in failures:
        print(f"skipped plugin {f.plugin!r} ({f.distribution or 'unknown distribution'}): {f.error}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adapterhub", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("plugins", help="list the installed adapter types")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    logging.getLogger("adapterhub").addHandler(logging.NullHandler())  # failures are printed below instead
    return plugins(args.json)


if __name__ == "__main__":
    sys.exit(main())
