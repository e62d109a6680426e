"""``starlight-proxy``: run the proxy (uvicorn serving ``create_app``).

    starlight-proxy [--config /etc/starlight/proxy.toml] [--listen ADDR] [--port N]
                    [--database PATH|postgresql://...] [--log-level LEVEL] [--check-config]

Flags override ``STARLIGHT_PROXY_*`` variables, which override the file (see ``config.py``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from starlight_core.errors import StarlightError
from starlight_proxy import __version__
from starlight_proxy.config import DEFAULT_CONFIG_PATH, ProxyConfig, load_config

__all__ = ["main", "parse_args"]

EXIT_CONFIG = 2


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="starlight-proxy",
        description="Serve Starlight delta bundles for the images of OCI registries.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"configuration file (default: $STARLIGHT_PROXY_CONFIG or {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument("--listen", metavar="ADDR", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, metavar="N", help="port to listen on (8090)")
    parser.add_argument(
        "--database",
        metavar="PATH|URL",
        help="SQLite file, or postgresql://user@host/db shared by several proxies",
    )
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error", "critical"), default=None
    )
    parser.add_argument(
        "--check-config", action="store_true", help="check the configuration and exit"
    )
    parser.add_argument("--version", action="version", version=f"starlight-proxy {__version__}")
    return parser.parse_args(argv)


def _serve(config: ProxyConfig) -> None:
    import uvicorn

    from starlight_proxy.app import create_app

    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.listen,
            port=config.port,
            log_level=config.log_level,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=10,
        )
    )
    server.run()
    if not server.started:
        # uvicorn logged why (port in use, database unreachable...): say so in the status.
        sys.exit(1)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        config = load_config(
            args.config,
            listen=args.listen,
            port=args.port,
            database=args.database,
            log_level=args.log_level,
        )
    except StarlightError as exc:
        print(f"starlight-proxy: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    if args.check_config:
        print(f"starlight-proxy: configuration OK ({config.listen}:{config.port})")
        return
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _serve(config)


if __name__ == "__main__":
    main()
