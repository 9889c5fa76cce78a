"""`python -m voiceline.soak`: see `voiceline.soak.runner`."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from voiceline.bench.generator import raise_open_file_limit
from voiceline.sim.ports import run_lane
from voiceline.soak.churn import ChurnOptions
from voiceline.soak.runner import load_average, run_soak

# From this process's port lane (below the ephemeral range, apart from concurrent test runs).
SERVER_RTP_PORTS = 2000
CALLER_PORTS = 600


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m voiceline.soak", description="Churn a real service with calls.")
    parser.add_argument("--calls", type=int, default=int(os.environ.get("SOAK_CALLS", "20000")), help="calls to place")
    parser.add_argument("--rate", type=float, default=80.0, help="calls placed per second")
    parser.add_argument("--hold", default="1.0-2.0", help="seconds an answered call stays up, MIN-MAX")
    parser.add_argument("--rtp-every", type=int, default=3, help="every n-th call sends RTP (0: none)")
    args = parser.parse_args()
    low, _, high = args.hold.partition("-")
    options = ChurnOptions(args.calls, args.rate, (float(low), float(high or low)), args.rtp_every)
    lane = run_lane()
    server_rtp = lane.claim("soak_server_rtp", SERVER_RTP_PORTS)
    caller_ports = lane.claim("soak_callers", CALLER_PORTS)
    raise_open_file_limit()
    print(f"voiceline soak: {options.calls} calls at {options.rate:g}/s, held {options.hold[0]:g}-{options.hold[1]:g} s, "
          f"RTP on 1 call in {options.rtp_every}; {os.cpu_count()} CPUs, load average {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="voiceline-soak-") as directory:
        report = run_soak(options, server_rtp, caller_ports, Path(directory))
    print("\n".join(report.lines()))
    print(f"load average {load_average()}")
    problems = report.problems()
    print("PASS" if not problems else "FAIL: " + "; ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
