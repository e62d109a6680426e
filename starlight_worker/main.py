"""``starlight-daemon``: the worker's containerd snapshotter and pull daemon."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import anyio

from starlight_core.errors import StarlightError
from starlight_worker import __version__
from starlight_worker.config import load_config
from starlight_worker.daemon import Daemon

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="starlight-daemon",
        description="Starlight worker: a containerd snapshotter that starts containers before "
        "their image has arrived. Configure containerd with\n"
        '  [proxy_plugins.starlight] type = "snapshot" '
        'address = "/run/starlight/snapshotter.sock"',
    )
    parser.add_argument(
        "--config", type=Path, help="TOML file (default /etc/starlight/daemon.toml)"
    )
    parser.add_argument("--proxy", help="proxy URL, e.g. http://proxy.example:8090")
    parser.add_argument("--proxy-user", help="USER:PASSWORD for the proxy")
    parser.add_argument("--root", help="store root (default /var/lib/starlight)")
    parser.add_argument("--run-dir", help="socket directory (default /run/starlight)")
    parser.add_argument("--containerd-address", help="containerd's socket")
    parser.add_argument("--namespace", help="containerd namespace for pulls (default: default)")
    parser.add_argument(
        "--content-timeout",
        type=float,
        help="seconds before a read of content that cannot arrive fails with EIO",
    )
    parser.add_argument("--log-level", help="debug, info, warning, error")
    parser.add_argument("--version", action="version", version=f"starlight-daemon {__version__}")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        config = load_config(
            args.config,
            proxy=args.proxy,
            proxy_user=args.proxy_user,
            root=args.root,
            run_dir=args.run_dir,
            containerd_address=args.containerd_address,
            namespace=args.namespace,
            content_timeout=args.content_timeout,
            log_level=args.log_level,
        )
    except StarlightError as exc:
        print(f"starlight-daemon: error: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    async def serve() -> None:
        daemon = Daemon(config)
        async with anyio.create_task_group() as tasks:
            await tasks.start(daemon.run)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    logging.getLogger(__name__).info("signal %s: stopping", signum)
                    tasks.cancel_scope.cancel()
                    break

    try:
        anyio.run(serve)
    except StarlightError as exc:
        print(f"starlight-daemon: error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
