"""The port lanes and the tests' table of blocks (voiceline/sim/ports.py, tests/port_table.py)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

import port_table
from voiceline.sim import plugin
from voiceline.sim.ports import EPHEMERAL_START, LANE_COUNT, LANE_PORTS, LOWEST_PORT, PortsExhausted, run_lane


def test_every_block_of_the_run_is_disjoint_even_and_below_the_ephemeral_range() -> None:
    lane = run_lane()
    plugin.default_server_rtp_ports(), plugin.default_sim_rtp_ports()  # the plugin's blocks too
    assert set(port_table.TABLE) <= set(lane.blocks)
    blocks = sorted(lane.blocks.values())
    assert all(first % 2 == 0 and lane.low <= first <= last <= lane.high for first, last in blocks)
    assert all(last < following for (_, last), (following, _) in zip(blocks, blocks[1:]))
    assert lane.high < EPHEMERAL_START and LOWEST_PORT + LANE_COUNT * LANE_PORTS <= EPHEMERAL_START


def test_concurrent_runs_get_different_lanes_and_a_lane_is_free_again_when_its_run_ends(tmp_path: Path) -> None:
    claim = run_lane.__wrapped__  # one claim per call, as separate processes would make
    runs = [claim(tmp_path) for _ in range(LANE_COUNT)]  # flock: another open file is another holder
    assert sorted(run.low for run in runs) == [LOWEST_PORT + n * LANE_PORTS for n in range(LANE_COUNT)]
    with pytest.raises(PortsExhausted, match=f"all {LANE_COUNT} port lanes are held"):
        claim(tmp_path)
    ended = runs.pop(1)
    ended.lock_file.close()  # the process ended: the kernel drops its lock
    runs.append(claim(tmp_path))
    assert runs[-1].low == ended.low
    for run in runs:
        run.lock_file.close()


def test_a_block_is_claimed_once_and_a_lane_does_not_overflow(tmp_path: Path) -> None:
    lane = run_lane.__wrapped__(tmp_path)
    lane.lock_file.close()
    assert lane.claim("a", 3) == (lane.low, lane.low + 2)
    assert lane.claim("b", 10) == (lane.low + 4, lane.low + 13)  # RTP starts on an even port
    assert lane.claim("a", 3) == (lane.low, lane.low + 2)
    with pytest.raises(ValueError):
        lane.claim("a", 4)
    with pytest.raises(PortsExhausted):
        lane.claim("c", LANE_PORTS)


def test_a_modules_ranges_stop_at_the_end_of_its_block() -> None:
    first, last = port_table.port_block("test_logs")
    assert list(itertools.islice(port_table.port_ranges("test_logs", 8), 2)) == [(first, first + 7), (first + 8, first + 15)]
    with pytest.raises(PortsExhausted, match="grow its block"):
        list(port_table.port_ranges("test_logs", last - first + 2))
