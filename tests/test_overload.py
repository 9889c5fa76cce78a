"""The sans-I/O overload guard on a fake clock: rate limits, capacity, scanners, bounded state."""

from __future__ import annotations

import pytest

from voiceline.sip.overload import OverloadGuard, OverloadLimits, RateLimit, Verdict

A, B = "127.0.0.1", "127.0.0.2"


def guard(**limits: object) -> OverloadGuard:
    return OverloadGuard(OverloadLimits(**limits))  # type: ignore[arg-type]


def test_a_burst_passes_then_requests_are_limited_to_the_rate() -> None:
    g = guard(rates={"OPTIONS": RateLimit(2.0, 5.0)})
    assert [g.check("OPTIONS", None, A, 0.0) for _ in range(6)] == [Verdict.ACCEPT] * 5 + [Verdict.DROP]
    # Two tokens per second come back, never more than the burst.
    assert g.check("OPTIONS", None, A, 0.5) is Verdict.ACCEPT
    assert g.check("OPTIONS", None, A, 0.5) is Verdict.DROP
    assert [g.check("OPTIONS", None, A, 100.0) for _ in range(6)].count(Verdict.ACCEPT) == 5
    assert g.counters.rate_limited == 3


def test_sources_and_methods_have_their_own_buckets() -> None:
    g = guard(rates={"INVITE": RateLimit(1.0, 1.0), "OPTIONS": RateLimit(1.0, 1.0)})
    assert g.check("INVITE", None, A, 0.0) is Verdict.ACCEPT
    assert g.check("INVITE", None, A, 0.0) is not Verdict.ACCEPT
    assert g.check("INVITE", None, B, 0.0) is Verdict.ACCEPT
    assert g.check("OPTIONS", None, A, 0.0) is Verdict.ACCEPT


def test_every_other_method_shares_one_bucket_per_source() -> None:
    g = guard(rates={"INVITE": RateLimit(1.0, 1.0)}, other=RateLimit(10.0, 20.0))
    made_up = [g.check(f"X{n}", None, A, 0.0) for n in range(15)]  # 15 method names a stranger made up
    rest = [g.check(method, None, A, 0.0) for method in ("MESSAGE", "BYE", "ACK", "INFO", "CANCEL", "UPDATE")]
    assert made_up == [Verdict.ACCEPT] * 15
    assert rest == [Verdict.ACCEPT] * 5 + [Verdict.DROP]  # the burst of 20 is spent, whatever the method
    assert g.check("INVITE", None, A, 0.0) is Verdict.ACCEPT  # a limited method keeps its own bucket
    assert g.check("BYE", None, B, 0.0) is Verdict.ACCEPT  # and every source its own
    assert g.check("BYE", None, A, 0.1) is Verdict.ACCEPT  # ten a second come back
    assert g.tracked_sources == 3  # (A, other), (A, INVITE), (B, other): not one per method name


def test_over_limit_invites_get_a_503_only_once_per_interval() -> None:
    g = guard(rates={"INVITE": RateLimit(1.0, 1.0)}, reject_interval=5.0)
    g.check("INVITE", None, A, 0.0)
    verdicts = [g.check("INVITE", None, A, 0.0) for _ in range(100)]
    assert verdicts.count(Verdict.REJECT) == 1 and verdicts[0] is Verdict.REJECT
    assert g.check("INVITE", None, A, 1.0) is Verdict.ACCEPT  # a token refilled
    assert g.check("INVITE", None, A, 1.0) is Verdict.DROP  # within 5 s of the last 503
    assert g.check("INVITE", None, A, 5.5) is Verdict.ACCEPT
    assert g.check("INVITE", None, A, 5.5) is Verdict.REJECT
    assert g.counters.rejected == 2


@pytest.mark.parametrize("agent", ["friendly-scanner", "SIPVicious/0.3", "sipcli/v1.8", "VaxSIPUserAgent/3.1"])
def test_scanner_user_agents_are_dropped(agent: str) -> None:
    g = guard()
    assert g.check("OPTIONS", agent, A, 0.0) is Verdict.DROP
    assert g.check("INVITE", agent, A, 0.0) is Verdict.DROP
    assert g.check("OPTIONS", "Linphone/5.2 (belle-sip)", A, 0.0) is Verdict.ACCEPT
    assert g.counters.scanners == 2


def test_per_source_state_is_bounded() -> None:
    g = guard(rates={"INVITE": RateLimit(1.0, 1.0)}, other=RateLimit(1.0, 1.0), max_sources=50, reject_interval=1.0)
    for n in range(5000):
        source = f"10.0.{n // 256}.{n % 256}"
        g.check("INVITE", None, source, float(n))
        g.check("INVITE", None, source, float(n))  # over limit: a reject entry
        g.check("MESSAGE", None, source, float(n))
        g.check("MESSAGE", None, source, float(n))  # over limit: dropped, nothing more kept
    assert g.tracked_sources <= 2 * 50 and len(g._last_reject) <= 50


def test_capacity() -> None:
    g = guard(max_calls=2)
    assert g.admit_call(0) and g.admit_call(1)
    assert not g.admit_call(2)
    assert g.counters.over_capacity == 1


def test_reports_are_aggregate_and_rate_limited() -> None:
    g = guard(rates={"OPTIONS": RateLimit(1.0, 1.0)}, report_interval=60.0)
    assert g.report(0.0) is None  # nothing happened
    for _ in range(4):
        g.check("OPTIONS", None, A, 0.0)
    assert g.report(0.0) == {"rate_limited": 3, "rejected": 0, "scanners": 0, "over_capacity": 0}
    g.check("OPTIONS", "friendly-scanner", A, 1.0)
    assert g.report(30.0) is None  # within the interval
    report = g.report(61.0)
    assert report == {"rate_limited": 0, "rejected": 0, "scanners": 1, "over_capacity": 0}
    assert all(A not in str(value) for value in report.values())
