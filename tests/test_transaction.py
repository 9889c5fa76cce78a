"""The sans-I/O transaction layer driven through its timers on a fake clock."""

from __future__ import annotations

from voiceline.sip.message import SipRequest, SipResponse, parse_message, response_to
from voiceline.sip.transaction import Incoming, State, Timers, TransactionLayer

SOURCE = ("127.0.0.1", 5080)
TIMERS = Timers(t1=0.5, t2=4.0, t4=5.0)


def request(method: str, branch: str = "z9hG4bKabc", cseq_method: str | None = None, to_tag: str = "") -> SipRequest:
    to = "<sip:line@127.0.0.1>" + (f";tag={to_tag}" if to_tag else "")
    text = (
        f"{method} sip:line@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5080;branch={branch}\r\n"
        "From: <sip:anon@127.0.0.1>;tag=f1\r\n"
        f"To: {to}\r\n"
        "Call-ID: call-1\r\n"
        f"CSeq: 1 {cseq_method or method}\r\n"
        "Max-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    message = parse_message(text.encode())
    assert isinstance(message, SipRequest)
    return message


def drain(layer: TransactionLayer, until: float) -> list[float]:
    """Times at which the layer sent something, stepping its deadlines up to `until`."""
    sent: list[float] = []
    while (deadline := layer.next_deadline()) is not None and deadline <= until:
        result = layer.poll(deadline)
        sent.extend(deadline for _ in result.sends)
    return sent


def test_invite_retransmission_resends_last_response() -> None:
    layer = TransactionLayer(TIMERS)
    kind, tx, _ = layer.on_request(request("INVITE"), SOURCE, 0.0)
    assert kind is Incoming.NEW and tx is not None
    layer.respond(tx, response_to(tx.request, 180, to_tag="t"), 0.0)
    kind, again, sends = layer.on_request(request("INVITE"), SOURCE, 0.3)
    assert kind is Incoming.ABSORBED and again is tx
    assert len(sends) == 1 and sends[0].data.startswith(b"SIP/2.0 180")


def test_2xx_retransmitted_on_timer_g_until_ack() -> None:
    layer = TransactionLayer(TIMERS)
    _, tx, _ = layer.on_request(request("INVITE"), SOURCE, 0.0)
    assert tx is not None
    layer.respond(tx, response_to(tx.request, 200, to_tag="t"), 0.0)
    # T1, then doubling, capped at T2: 0.5, 1.5, 3.5, 7.5
    assert drain(layer, 8.0) == [0.5, 1.5, 3.5, 7.5]
    kind, _, _ = layer.on_request(request("ACK", branch="z9hG4bKother", to_tag="t"), SOURCE, 8.0)
    assert kind is Incoming.ACK
    layer.acknowledged(tx, 8.0)
    assert drain(layer, 40.0) == []
    assert tx.state is State.TERMINATED  # Timer H let it go quietly
    assert layer.active == 0


def test_2xx_without_ack_times_out_after_64_t1() -> None:
    layer = TransactionLayer(TIMERS)
    _, tx, _ = layer.on_request(request("INVITE"), SOURCE, 0.0)
    assert tx is not None
    layer.respond(tx, response_to(tx.request, 200, to_tag="t"), 0.0)
    sends = drain(layer, 31.9)
    assert sends[-1] <= 31.9 and all(b - a <= 4.0 for a, b in zip(sends, sends[1:]))
    result = layer.poll(32.0)
    assert result.unacknowledged == [tx]


def test_error_response_absorbs_ack_and_stops_retransmitting() -> None:
    layer = TransactionLayer(TIMERS)
    _, tx, _ = layer.on_request(request("INVITE"), SOURCE, 0.0)
    assert tx is not None
    layer.respond(tx, response_to(tx.request, 487, to_tag="t"), 0.0)
    assert drain(layer, 1.0) == [0.5]
    kind, _, _ = layer.on_request(request("ACK"), SOURCE, 1.0)  # same branch as the INVITE
    assert kind is Incoming.ABSORBED and tx.state is State.CONFIRMED
    assert drain(layer, 5.9) == []
    layer.poll(6.0)  # Timer I = T4 after the ACK
    assert tx.state is State.TERMINATED


def test_non_invite_server_completes_and_absorbs_retransmissions_until_timer_j() -> None:
    layer = TransactionLayer(TIMERS)
    _, tx, _ = layer.on_request(request("BYE", to_tag="t"), SOURCE, 0.0)
    assert tx is not None
    layer.respond(tx, response_to(tx.request, 200), 0.0)
    kind, _, sends = layer.on_request(request("BYE", to_tag="t"), SOURCE, 10.0)
    assert kind is Incoming.ABSORBED and sends[0].data.startswith(b"SIP/2.0 200")
    layer.poll(32.0)
    kind, _, _ = layer.on_request(request("BYE", to_tag="t"), SOURCE, 32.1)
    assert kind is Incoming.NEW


def test_cancel_finds_its_invite() -> None:
    layer = TransactionLayer(TIMERS)
    _, invite, _ = layer.on_request(request("INVITE"), SOURCE, 0.0)
    cancel = request("CANCEL")
    kind, cancel_tx, _ = layer.on_request(cancel, SOURCE, 0.1)
    assert kind is Incoming.NEW and cancel_tx is not invite
    assert layer.find_invite(cancel) is invite


def test_rfc2543_requests_without_magic_cookie_still_match() -> None:
    layer = TransactionLayer(TIMERS)
    kind, tx, _ = layer.on_request(request("OPTIONS", branch="old1"), SOURCE, 0.0)
    assert kind is Incoming.NEW and tx is not None
    kind, again, _ = layer.on_request(request("OPTIONS", branch="old1"), SOURCE, 0.1)
    assert kind is Incoming.ABSORBED and again is tx


def test_client_bye_retransmits_on_timer_e_and_times_out_on_f() -> None:
    layer = TransactionLayer(TIMERS)
    bye = request("BYE", branch="z9hG4bKbye", to_tag="t")
    tx, sends = layer.send_request(bye, SOURCE, 0.0)
    assert len(sends) == 1
    times: list[float] = []
    timed_out = []
    while (deadline := layer.next_deadline()) is not None and deadline <= 40:
        result = layer.poll(deadline)
        times.extend(deadline for _ in result.sends)
        timed_out.extend(result.timed_out)
    assert times[:5] == [0.5, 1.5, 3.5, 7.5, 11.5]
    assert timed_out == [tx] and tx.timed_out and layer.active == 0


def test_client_bye_final_response_completes() -> None:
    layer = TransactionLayer(TIMERS)
    bye = request("BYE", branch="z9hG4bKbye2", to_tag="t")
    tx, _ = layer.send_request(bye, SOURCE, 0.0)
    trying = response_to(bye, 100)
    assert layer.on_response(trying, 0.2) is None and tx.state is State.PROCEEDING
    assert drain(layer, 4.6) == [0.5, 4.5]  # after a provisional, retransmit every T2
    ok: SipResponse = response_to(bye, 200)
    assert layer.on_response(ok, 5.0) is tx and tx.response is ok
    assert layer.on_response(ok, 5.1) is None  # a retransmitted 200 is not delivered twice
    layer.poll(10.0)
    assert layer.active == 0


def test_timer_k_absorbs_retransmitted_finals_then_lets_go() -> None:
    layer = TransactionLayer(TIMERS)
    bye = request("BYE", branch="z9hG4bKbye3", to_tag="t")
    tx, _ = layer.send_request(bye, SOURCE, 0.0)
    assert layer.on_response(response_to(bye, 200), 1.0) is tx
    assert tx.state is State.COMPLETED and layer.next_deadline() == 1.0 + TIMERS.t4
    layer.poll(5.9)
    assert layer.on_response(response_to(bye, 200), 5.9) is None and layer.active == 1
    layer.poll(6.0)
    assert tx.state is State.TERMINATED and layer.active == 0


def client_invite(layer: TransactionLayer, branch: str = "z9hG4bKinv") -> tuple[SipRequest, object]:
    invite = request("INVITE", branch=branch)
    tx, sends = layer.send_request(invite, SOURCE, 0.0)
    assert len(sends) == 1 and sends[0].data.startswith(b"INVITE ")
    return invite, tx


def test_client_invite_timer_a_doubles_without_cap_and_timer_b_gives_up() -> None:
    layer = TransactionLayer(TIMERS)
    _, tx = client_invite(layer)
    times: list[float] = []
    timed_out = []
    while (deadline := layer.next_deadline()) is not None and deadline <= 40:
        result = layer.poll(deadline)
        times.extend(deadline for _ in result.sends)
        timed_out.extend(result.timed_out)
    # 2^n * T1 after the first send, not capped at T2 as Timer E is; B at 64*T1 = 32 s.
    assert times == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert timed_out == [tx] and layer.active == 0


def test_client_invite_provisional_stops_timers_a_and_b() -> None:
    layer = TransactionLayer(TIMERS)
    invite, tx = client_invite(layer)
    assert layer.on_response(response_to(invite, 180, to_tag="p"), 0.2) is None
    assert tx.state is State.PROCEEDING  # type: ignore[attr-defined]
    assert drain(layer, 100.0) == [] and layer.active == 1


def test_client_invite_error_is_acked_by_the_transaction_and_timer_d_absorbs_repeats() -> None:
    layer = TransactionLayer(TIMERS)
    invite, tx = client_invite(layer)
    busy = response_to(invite, 486, to_tag="peer")
    assert layer.on_response(busy, 0.3) is tx
    [ack] = layer.take_sends()
    ack_request = parse_message(ack.data)
    assert isinstance(ack_request, SipRequest) and ack_request.method == "ACK" and ack.dest == SOURCE
    assert ack_request.headers.get("Via") == invite.headers.get("Via")  # same branch: same transaction
    assert ack_request.headers.get("CSeq") == "1 ACK"
    assert (ack_request.headers.get("To") or "").endswith(";tag=peer")
    assert layer.take_sends() == []
    # A retransmitted 486 (our ACK was lost) is answered by the same ACK, not given to the TU again.
    assert layer.on_response(busy, 1.0) is None
    assert [s.data for s in layer.take_sends()] == [ack.data]
    assert drain(layer, 32.2) == []  # no INVITE retransmissions in Completed
    assert layer.active == 1
    layer.poll(32.3)  # Timer D = 32 s after the 486
    assert layer.active == 0


def test_client_invite_every_2xx_goes_to_the_tu_until_timer_m() -> None:
    layer = TransactionLayer(TIMERS)
    invite, tx = client_invite(layer)
    ok = response_to(invite, 200, to_tag="peer")
    assert layer.on_response(ok, 0.1) is tx and tx.state is State.ACCEPTED  # type: ignore[attr-defined]
    assert layer.on_response(ok, 0.6) is tx  # the TU re-sends its own ACK for each 2xx
    assert layer.take_sends() == []  # the transaction never ACKs a 2xx
    assert drain(layer, 31.0) == []
    layer.poll(32.1)
    assert layer.on_response(ok, 32.2) is None and layer.active == 0


def test_request_looping_back_through_our_own_via_gets_loop() -> None:
    layer = TransactionLayer(TIMERS)
    ours = request("OPTIONS", branch="z9hG4bKmine")
    layer.send_request(ours, SOURCE, 0.0)
    # A proxy sent our OPTIONS back to us: its Via is on top, ours (same sent-by and branch) below.
    text = (
        "OPTIONS sip:line@127.0.0.1 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bKproxy\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bKmine\r\n"
        "From: <sip:anon@127.0.0.1>;tag=f1\r\nTo: <sip:line@127.0.0.1>\r\n"
        "Call-ID: call-1\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 69\r\nContent-Length: 0\r\n\r\n"
    )
    looped = parse_message(text.encode())
    assert isinstance(looped, SipRequest)
    kind, tx, _ = layer.on_request(looped, ("10.0.0.9", 5060), 0.1)
    assert kind is Incoming.LOOP and tx is not None
    # The same branch with another sent-by is somebody else's request.
    elsewhere = text.replace("127.0.0.1:5080;", "127.0.0.2:5080;").replace("z9hG4bKproxy", "z9hG4bKproxy2")
    other = parse_message(elsewhere.replace("tag=f1", "tag=f2").encode())
    assert isinstance(other, SipRequest)
    assert layer.on_request(other, ("10.0.0.8", 5060), 0.2)[0] is Incoming.NEW


def test_merged_request_with_another_branch_gets_loop_until_the_first_ends() -> None:
    layer = TransactionLayer(TIMERS)
    kind, first, _ = layer.on_request(request("INVITE", branch="z9hG4bKpath1"), SOURCE, 0.0)
    assert kind is Incoming.NEW and first is not None
    kind, merged, _ = layer.on_request(request("INVITE", branch="z9hG4bKpath2"), ("127.0.0.1", 5090), 0.1)
    assert kind is Incoming.LOOP and merged is not None and merged is not first
    # A retransmission of the merged copy is absorbed by its own transaction once answered 482.
    layer.respond(merged, response_to(merged.request, 482, to_tag="x"), 0.1)
    assert layer.on_request(request("INVITE", branch="z9hG4bKpath2"), ("127.0.0.1", 5090), 0.2)[0] is Incoming.ABSORBED
    layer.respond(first, response_to(first.request, 486, to_tag="y"), 0.3)
    drain(layer, 40.0)  # Timer H ends the first transaction: the request may come again as new
    assert layer.on_request(request("INVITE", branch="z9hG4bKpath3"), SOURCE, 41.0)[0] is Incoming.NEW
