"""`python -m voiceline.bench`: see `voiceline.bench.runner`."""

from __future__ import annotations

import argparse
import sys

from voiceline.bench.runner import BenchOptions, bench


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m voiceline.bench", description="Load test the RTP relay.")
    parser.add_argument("--levels", default="50,100,200,300,400,500,600", help="pair counts to ramp through")
    parser.add_argument("--hold", type=float, default=8.0, help="seconds measured per level")
    parser.add_argument("--workers", type=int, default=2, help="generator processes")
    parser.add_argument("--rtp-ports", default="24000-29999", help="the server's RTP port range")
    args = parser.parse_args()
    levels = sorted({int(level) for level in args.levels.split(",") if level.strip()})
    return bench(BenchOptions(levels, args.hold, args.workers), args.rtp_ports)


if __name__ == "__main__":
    sys.exit(main())
