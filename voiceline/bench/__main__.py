"""`python -m voiceline.bench`: see `voiceline.bench.runner`."""

from __future__ import annotations

import argparse
import sys

from voiceline.bench.engine import engine_only
from voiceline.bench.runner import BenchOptions, bench, bench_side_by_side
from voiceline.bench.uac import SCENARIOS


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m voiceline.bench", description="Load test the RTP relay.")
    parser.add_argument(
        "--levels",
        help="pair counts (default 100,200,...,800; with --side-by-side or --engine-only 100,250,500, "
        "pcmu-opus 50,100 with --side-by-side)",
    )
    parser.add_argument("--hold", type=float, default=8.0, help="seconds measured per level")
    parser.add_argument("--workers", type=int, default=2, help="generator processes")
    parser.add_argument(
        "--realtime-priority",
        type=int,
        default=10,
        help="SCHED_RR priority for the server and the generator (0: normal scheduling)",
    )
    parser.add_argument("--rtp-ports", default="24000-29999", help="the server's RTP port range")
    parser.add_argument(
        "--side-by-side",
        action="store_true",
        help="run the same load against voiceline and rtpengine (userspace), alternating, per scenario",
    )
    parser.add_argument(
        "--engine-only",
        action="store_true",
        help="the media engine alone in this process: plain, in-band and transcoded pairs, and as many legs waiting with music and reassurance (no SIP, no rtpengine)",
    )
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"with --side-by-side: of {', '.join(SCENARIOS)}"
    )
    parser.add_argument("--repetitions", type=int, default=3, help="with --side-by-side: runs per relay and scenario; with --engine-only: runs per level")
    parser.add_argument("--rtpengine-ports", default="20000-23999", help="rtpengine's RTP port range")
    parser.add_argument(
        "--relay",
        action="append",
        dest="relays",
        help="with --side-by-side, repeatable: rtpengine, voiceline, or voiceline with [media] settings, "
        "e.g. voiceline:kernel_forwarding=off (default: voiceline with the kernel path, without it, and rtpengine)",
    )
    args = parser.parse_args()
    default_levels = "100,250,500" if args.side_by_side or args.engine_only else "100,200,300,400,500,600,700,800"
    levels = sorted({int(level) for level in (args.levels or default_levels).split(",") if level.strip()})
    if args.engine_only:
        return engine_only(levels, args.hold, args.rtp_ports, args.repetitions)
    options = BenchOptions(levels, args.hold, args.workers, realtime_priority=args.realtime_priority)
    if args.side_by_side:
        try:
            scenarios = [SCENARIOS[name.strip()] for name in args.scenarios.split(",") if name.strip()]
        except KeyError as error:
            parser.error(f"unknown scenario {error}")
        relays = args.relays or ["voiceline", "voiceline:kernel_forwarding=off", "rtpengine"]
        return bench_side_by_side(
            options, scenarios, args.repetitions, args.rtp_ports, args.rtpengine_ports, relays, args.levels is None
        )
    return bench(options, args.rtp_ports)


if __name__ == "__main__":
    sys.exit(main())
