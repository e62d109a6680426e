"""``python -m starlight_worker.snapshotter --root DIR --address SOCKET``: a plain overlay
snapshotter for containerd's ``proxy_plugins`` (no starlight layers), for tests and debugging."""

from __future__ import annotations

import argparse
import logging

from starlight_worker.snapshotter.server import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m starlight_worker.snapshotter")
    parser.add_argument("--root", required=True, help="directory for metadata and snapshots")
    parser.add_argument("--address", required=True, help="unix socket to listen on")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    run(args.root, args.address)


if __name__ == "__main__":
    main()
