"""``python -m benchmarks.wan.link``: set up an emulated WAN link, measure it, print, tear down.

    python -m benchmarks.wan.link --rtt 150 --rate 100 --verify     # one link, measured
    python -m benchmarks.wan.link --sweep                            # every default setting
    python -m benchmarks.wan.link --rtt 50 --rate 100                # keep it up until Ctrl-C

(``python -m benchmarks.wan`` is the whole benchmark: ``benchmarks.wan.harness``.)

Exit status 1 when a measurement strays from the configuration by more than the tolerances.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from pathlib import Path

from benchmarks.wan.link import DEFAULT_SWEEP, LinkConfig, WanLink
from benchmarks.wan.verify import LinkReport

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.wan.link",
        description="An emulated WAN link between two network namespaces (needs root).",
    )
    parser.add_argument("--rtt", type=float, default=150.0, help="round-trip time, ms")
    parser.add_argument("--rate", type=float, default=100.0, help="rate, Mbit/s (IP bytes)")
    parser.add_argument(
        "--queue-bytes", type=int, default=None, help="router buffer (default: one BDP)"
    )
    parser.add_argument(
        "--offload",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TUN segmentation offload (off: one packet per read, CPU-bound above ~50 Mbit/s)",
    )
    parser.add_argument("--congestion", default=None, help="TCP congestion control to use")
    parser.add_argument("--verify", action="store_true", help="measure the link, then exit")
    parser.add_argument("--sweep", action="store_true", help="verify every default setting")
    parser.add_argument("--seconds", type=float, default=None, help="bulk transfer length")
    parser.add_argument("--json", type=Path, default=None, help="write the reports here")
    parser.add_argument("--rtt-tolerance", type=float, default=0.15, help="relative, e.g. 0.15")
    parser.add_argument("--rate-tolerance", type=float, default=0.10, help="relative")
    return parser


def _within(report: LinkReport, rtt_tolerance: float, rate_tolerance: float) -> bool:
    # Absolute slack of 0.5 ms on the RTT: the forwarder's own latency, which only a 2 ms
    # link notices.
    rtt_ok = abs(report.connect_rtt_ms - report.config.rtt_ms) <= max(
        rtt_tolerance * report.config.rtt_ms, 0.5
    )
    return rtt_ok and abs(report.throughput_error()) <= rate_tolerance


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.sweep:
        configs = list(DEFAULT_SWEEP)
    else:
        configs = [
            LinkConfig(
                rtt_ms=args.rtt,
                rate_mbit=args.rate,
                queue_bytes=args.queue_bytes,
                offload=args.offload,
                congestion=args.congestion,
            )
        ]
    if not args.verify and not args.sweep:
        with WanLink.for_config(configs[0]) as link:
            print(
                f"WAN link {link.config.label} up: cloud {link.cloud} ({link.cloud_ip}),"
                f" edge {link.edge} ({link.edge_ip}); run things with"
                f" 'nsenter --net=/run/netns/<namespace> -- COMMAND'. Ctrl-C to tear down.",
                flush=True,
            )
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        return 0

    reports = []
    all_ok = True
    for config in configs:
        with WanLink.for_config(config) as link:
            report = link.verify(transfer_seconds=args.seconds)
        ok = _within(report, args.rtt_tolerance, args.rate_tolerance)
        all_ok &= ok
        print(report.render() + ("" if ok else "\n  ** OUTSIDE TOLERANCE **"), flush=True)
        reports.append(report.as_dict())
    if args.json is not None:
        args.json.write_text(json.dumps(reports, indent=2, default=str) + "\n")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
