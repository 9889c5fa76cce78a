"""`python -m voiceline.bench`: see `voiceline.bench.runner`."""

from __future__ import annotations

import argparse
import sys

from voiceline.bench.runner import BenchOptions, bench


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m voiceline.bench", description="Load test the RTP relay.")
    parser.add_argument("--levels", default="100,200,300,400,500,600,700,800", help="pair counts to ramp through")
    parser.add_argument("--hold", type=float, default=8.0, help="seconds measured per level")
    parser.add_argument("--workers", type=int, default=2, help="generator processes")
    parser.add_argument(
        "--realtime-priority",
        type=int,
        default=10,
        help="SCHED_RR priority for the server and the generator (0: normal scheduling)",
    )
    parser.add_argument("--rtp-ports", default="24000-29999", help="the server's RTP port range")
    args = parser.parse_args()
    levels = sorted({int(level) for level in args.levels.split(",") if level.strip()})
    return bench(BenchOptions(levels, args.hold, args.workers, realtime_priority=args.realtime_priority), args.rtp_ports)


if __name__ == "__main__":
    sys.exit(main())
