"""Every port a test chooses itself, as blocks of this run's lane (voiceline.sim.ports): below the
kernel's ephemeral range (32768+, where SIP listen port 0 and raw peers get theirs) and disjoint
from the blocks of any other test run on the machine.

One table: a module's block, laid out in this order. The pytest plugin claims its own blocks too
(`voiceline_server` and `sim_calls` defaults, see voiceline/sim/plugin.py); claims never overlap.
"""

from __future__ import annotations

from collections.abc import Iterator

from voiceline.sim.ports import PortsExhausted, run_lane

TABLE: dict[str, int] = {
    "test_asyncio_edge": 20,  # our SIP port per test
    "test_cli": 100,  # `voiceline serve --rtp-ports`
    "test_client_invite": 201,  # our SIP port and SIPp's, 4 per call; then a port only named in our SDP
    "test_crash": 2,  # our SIP port, kept across a restart; then a port only named in SDP
    "test_dialogs": 600,  # 20 per service
    "test_kamailio": 20,  # Kamailio's SIP port (a fixed port in its configuration)
    "test_lifecycle": 100,  # 50 for `serve --rtp-ports` of servers that must not start; then a port only named in SDP
    "test_kernel_path": 300,  # 100 per engine
    "test_kernel_path_veth": 100,  # the engine's, in a network namespace of the test's own
    "test_logs": 20,
    "test_media": 140,  # 100 for the engine, then small ranges with fixed layouts
    "test_media_features": 210,  # 100 for the engine, 100 for a second engine, a phone's RTP/RTCP pair
    "test_media_security": 800,  # a small engine, then up to 100 per service
    "test_partings": 40,  # 20 per service
    "test_plugin": 300,  # a SIP port, then the server's and the callers' RTP ranges
    "test_provisioning_cli": 2,
    "test_safety_interop": 30,  # the help line's SIP and RTP ports, SIPp's, a registrar nobody answers on  # a port nobody answers on
    "test_sim_caller": 100,  # a silent port, then 10 per SIPp
    "test_sip_security": 400,  # 20 per service
    "test_soak": 140,  # the server's RTP range (100), then the callers' SIP, sink and RTP sockets
    "test_srtp": 320,  # 100 for the legs, a phone's RTP/RTCP pair, 20 per service
    "test_transport": 400,  # 20 per service
    "test_trunk_admission": 600,  # 20 per service
    "test_useragent": 400,  # 20 per service
    "test_bench": 102,  # rtpengine's ng port, then its RTP range
}


def port_block(module: str) -> tuple[int, int]:
    """The block (first, last) the table gives `module`."""
    return run_lane().claim(module, TABLE[module])


def port_ranges(module: str, size: int) -> Iterator[tuple[int, int]]:
    """Consecutive ranges of `size` ports from `module`'s block, one per service a test starts."""
    first, last = port_block(module)
    for low in range(first, last - size + 2, size):
        yield low, low + size - 1
    raise PortsExhausted(f"{module}'s {last - first + 1} ports are used up: grow its block in port_table.TABLE")


for _module in TABLE:  # the layout follows the table, whichever module asks first
    port_block(_module)
