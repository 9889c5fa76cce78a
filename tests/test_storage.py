import asyncio
import base64
import contextlib
import hashlib
import os
import shutil
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from voiceline import storage
from voiceline.config import Config, StorageConfig
from voiceline.keyfile import KEY_FILE_NAME
from voiceline.provisioning import Provisioning, TrunkChanges, load
from voiceline.sip.auth import digest_ha1
from voiceline.storage import DB_FILES, DB_NAME, CallAudio, Storage, StorageError, hour_of

CALL_COLUMNS = (
    "hour", "line", "calls", "paired", "wait_seconds", "talk_seconds", "packets_expected", "packets_lost", "jitter_ms_max",
)  # fmt: skip
CANARY = "+15550001234"
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Storage]:
    s = await Storage.open(tmp_path / "data")
    yield s
    await s.close()


def query(db_path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db_path) as db:
        return db.execute(sql).fetchall()


async def test_open_creates_private_dir_schema_and_version(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "data"
    s = await Storage.open(data_dir)
    await s.close()
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    db_path = data_dir / DB_NAME
    assert query(db_path, "SELECT version FROM schema_version") == [(len(storage.MIGRATIONS),)]
    columns = {row[1] for row in query(db_path, "PRAGMA table_info(hourly_stats)")}
    assert columns == {
        "hour", "line", "calls", "paired", "wait_seconds", "talk_seconds", "packets_expected", "packets_lost", "jitter_ms_max",
        "wait_paired", "wait_paired_seconds", "wait_abandoned", "wait_abandoned_seconds", "max_wait_goodbye", "skip",
        "talk_limit_ending", "preference_match", "help_request", "help_connected", "help_failed", "report",
        "cooldown_started", "rate_limited",
    }  # fmt: skip


async def test_wal_mode(store: Storage, tmp_path: Path) -> None:
    assert query(tmp_path / "data" / DB_NAME, "PRAGMA journal_mode") == [("wal",)]


async def test_reopen_does_not_rerun_migrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = await Storage.open(tmp_path)
    await s.record_call("main", T0, 1.0, 2.0, True)
    await s.close()
    # Re-running migration 1 would fail: its table exists.
    s = await Storage.open(tmp_path)
    assert len(await s.hourly()) == 1
    await s.close()
    # A new migration is applied once, on top of the existing data.
    monkeypatch.setattr(storage, "MIGRATIONS", (*storage.MIGRATIONS, "CREATE TABLE extra (name TEXT PRIMARY KEY);"))
    for _ in range(2):
        s = await Storage.open(tmp_path)
        await s.close()
    assert query(tmp_path / DB_NAME, "SELECT version FROM schema_version") == [(len(storage.MIGRATIONS),)]
    assert query(tmp_path / DB_NAME, "SELECT count(*) FROM hourly_stats") == [(1,)]


async def test_failed_migration_is_rolled_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = await Storage.open(tmp_path)
    await s.close()
    broken = "CREATE TABLE extra (name TEXT); CREATE TABLE extra (name TEXT);"
    current = len(storage.MIGRATIONS)
    monkeypatch.setattr(storage, "MIGRATIONS", (*storage.MIGRATIONS, broken))
    with pytest.raises(StorageError):
        await Storage.open(tmp_path)
    assert query(tmp_path / DB_NAME, "SELECT version FROM schema_version") == [(current,)]
    assert query(tmp_path / DB_NAME, "SELECT name FROM sqlite_master WHERE name = 'extra'") == []


async def test_newer_schema_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = await Storage.open(tmp_path)
    await s.close()
    monkeypatch.setattr(storage, "MIGRATIONS", ())
    with pytest.raises(StorageError, match="newer"):
        await Storage.open(tmp_path)


async def test_record_call_aggregates_per_hour_and_line(store: Storage) -> None:
    await store.record_call("main", T0, 10.0, 60.0, True)
    await store.record_call("main", T0 + 60, 5.5, 0.0, False)
    await store.record_call("main", T0 + 3600, 1.0, 2.0, True)
    await store.record_call("night", T0, 3.0, 4.0, True)
    assert [{k: row[k] for k in CALL_COLUMNS} for row in await store.hourly("main")] == [
        {"hour": "2023-11-14T22", "line": "main", "calls": 2, "paired": 1, "wait_seconds": 15.5, "talk_seconds": 60.0,
         "packets_expected": 0, "packets_lost": 0, "jitter_ms_max": 0.0},
        {"hour": "2023-11-14T23", "line": "main", "calls": 1, "paired": 1, "wait_seconds": 1.0, "talk_seconds": 2.0,
         "packets_expected": 0, "packets_lost": 0, "jitter_ms_max": 0.0},
    ]  # fmt: skip
    assert [(r["hour"], r["line"]) for r in await store.hourly()] == [
        ("2023-11-14T22", "main"),
        ("2023-11-14T22", "night"),
        ("2023-11-14T23", "main"),
    ]


async def test_call_audio_adds_packets_and_keeps_the_worst_jitter(store: Storage) -> None:
    await store.record_call("main", T0, 1.0, 60.0, True, CallAudio(3000, 30, 4.5))
    await store.record_call("main", T0 + 60, 1.0, 60.0, True, CallAudio(2000, 0, 12.25))
    await store.record_call("main", T0 + 120, 1.0, 0.0, False)  # ended before any media
    (row,) = await store.hourly()
    assert (row["calls"], row["packets_expected"], row["packets_lost"], row["jitter_ms_max"]) == (3, 5000, 30, 12.25)


@pytest.mark.parametrize("audio", [CallAudio(10, 11, 0.0), CallAudio(10, -1, 0.0), CallAudio(10, 0, float("nan"))])
async def test_impossible_call_audio_is_refused(store: Storage, audio: CallAudio) -> None:
    with pytest.raises(ValueError):
        await store.record_call("main", T0, 1.0, 1.0, True, audio)
    assert await store.hourly() == []


async def test_upgrade_keeps_the_hours_recorded_before_audio_was_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as before:
        before.setattr(storage, "MIGRATIONS", storage.MIGRATIONS[:2])
        s = await Storage.open(tmp_path)
        await s.close()
    with sqlite3.connect(tmp_path / DB_NAME) as db:  # an hour recorded by the version before
        db.execute(
            "INSERT INTO hourly_stats (hour, line, calls, paired, wait_seconds, talk_seconds) VALUES (?, 'main', 1, 1, 8.0, 90.0)",
            (hour_of(T0),),
        )
    s = await Storage.open(tmp_path)
    await s.record_call("main", T0, 1.0, 10.0, True, CallAudio(500, 5, 2.0))
    (row,) = await s.hourly()
    await s.close()
    assert (row["calls"], row["talk_seconds"], row["packets_expected"], row["packets_lost"]) == (2, 100.0, 500, 5)


def test_hour_is_utc() -> None:
    assert hour_of(T0) == "2023-11-14T22"
    assert hour_of(0.0) == "1970-01-01T00"


@pytest.mark.parametrize(("waited", "talked"), [(-1.0, 0.0), (0.0, float("nan")), (float("inf"), 0.0)])
async def test_bad_durations_are_refused(store: Storage, waited: float, talked: float) -> None:
    with pytest.raises(ValueError):
        await store.record_call("main", T0, waited, talked, False)
    assert await store.hourly() == []


async def test_concurrent_record_call_sums_exactly(store: Storage) -> None:
    await asyncio.gather(*(store.record_call("main", T0, 0.5, 2.0, i % 2 == 0) for i in range(50)))
    (row,) = await store.hourly()
    assert (row["calls"], row["paired"], row["wait_seconds"], row["talk_seconds"]) == (50, 25, 25.0, 100.0)


async def test_corrupt_file_raises_and_is_left_untouched(tmp_path: Path) -> None:
    db_path = tmp_path / DB_NAME
    garbage = b"not a database, just precious bytes\n" * 200
    db_path.write_bytes(garbage)
    with pytest.raises(StorageError, match="left untouched") as info:
        await Storage.open(tmp_path)
    assert str(db_path) in str(info.value)
    assert db_path.read_bytes() == garbage
    assert sorted(p.name for p in tmp_path.iterdir()) == [DB_NAME]


async def test_unusable_data_dir_raises(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(StorageError, match="cannot create or protect data directory"):
        await Storage.open(not_a_dir)


def canary_forms() -> list[bytes]:
    forms = [CANARY, CANARY.lstrip("+"), "5550001234", f"sip:{CANARY}", f"tel:{CANARY}"]
    found = [f.encode() for f in forms]
    for f in forms:
        for algo in ("md5", "sha1", "sha256"):
            digest = hashlib.new(algo, f.encode())
            found += [digest.hexdigest().encode(), digest.digest()]
    return found


def assert_no_canary(data_dir: Path) -> list[str]:
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    for path in files:
        content = path.read_bytes()
        for form in canary_forms():
            assert form not in content, f"canary form in {path.name}"
    return [p.name for p in files]


async def test_data_dir_holds_no_canary(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    s = await Storage.open(data_dir)
    for i in range(20):
        await s.record_call("main", T0 + i * 600, 3.0, 120.0, True)
    assert await s.flush()
    # While open, the aggregates are still in the -wal file: scan it too.
    assert f"{DB_NAME}-wal" in assert_no_canary(data_dir)
    await s.close()
    assert_no_canary(data_dir)


async def test_trunks_and_lines_round_trip_and_refuse_duplicates(store: Storage) -> None:
    await store.add("trunks", "carrier", {"sources": ["192.0.2.0/24"], "password": "s3cret"}, enabled=False)
    await store.add("lines", "general", {"numbers": ["100"], "max_calls": 0})
    with pytest.raises(storage.DuplicateName, match="trunk 'carrier' already exists"):
        await store.add("trunks", "carrier", {})
    assert await store.records("trunks") == [
        {"name": "carrier", "settings": {"sources": ["192.0.2.0/24"], "password": "s3cret"}, "enabled": False}
    ]
    await store.set_enabled("carrier", True)
    await store.update("lines", "general", {"numbers": ["100", "101"], "max_calls": 2})
    assert (await store.records("trunks"))[0]["enabled"] is True
    assert (await store.records("lines"))[0]["settings"]["numbers"] == ["100", "101"]
    for operation in (store.remove("lines", "nope"), store.update("trunks", "nope", {}), store.set_enabled("nope", True)):
        with pytest.raises(storage.UnknownName):
            await operation
    await store.set_registration_status("carrier", "registered", "200 OK", T0, T0 + 3600, T0 + 3540)
    assert [r["state"] for r in await store.registration_status()] == ["registered"]
    await store.remove("trunks", "carrier")
    assert await store.records("trunks") == [] and await store.registration_status() == []


async def test_data_version_moves_on_another_connections_write_only(store: Storage, tmp_path: Path) -> None:
    before = await store.data_version()
    await store.add("lines", "own", {"numbers": ["1"]})
    assert await store.data_version() == before  # our own write
    other = await Storage.open(tmp_path / "data")
    await other.add("lines", "theirs", {"numbers": ["2"]})
    await other.close()
    assert await store.data_version() != before


async def test_refusals_are_counted_per_hour_and_reason(store: Storage) -> None:
    await store.record_refusal("unknown_source", T0)
    await store.record_refusal("unknown_source", T0 + 10, count=4)
    await store.record_refusal("unknown_number", T0)
    assert await store.refusals() == [
        {"hour": "2023-11-14T22", "reason": "unknown_number", "count": 1},
        {"hour": "2023-11-14T22", "reason": "unknown_source", "count": 5},
    ]


async def test_a_call_counts_when_answered_and_its_figures_join_that_hour(store: Storage) -> None:
    await store.record_answer("main", T0)
    await store.record_journey("main", T0 + 1000, {"wait_paired": 1}, {"wait_paired": 1000.0})
    await store.record_call("main", T0 + 3600, 1000.0, 2600.0, True, answered_at=T0)  # ended the next hour
    rows = await store.hourly("main")
    assert [(r["hour"], r["calls"], r["paired"], r["talk_seconds"], r["wait_paired"]) for r in rows] == [
        ("2023-11-14T22", 1, 1, 2600.0, 1)
    ]


async def test_hours_come_from_the_clock_anchored_at_open(store: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    real = time.time()
    monkeypatch.setattr(time, "time", lambda: T0)  # the system clock is stepped years back
    await store.record_answer("main", store.clock())
    (row,) = await store.hourly()
    assert row["hour"] in {hour_of(real), hour_of(real + 60)} and row["hour"] != hour_of(T0)


async def test_busiest_hours_from_the_stored_history(store: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        now = T0 + 20 * 86400
        for day in range(1, 15):
            for hour_offset, calls in ((-3, 3), (-2, 4), (-1, 3), (0, 1)):  # 19:00 to 22:00 UTC each day
                for _ in range(calls):
                    await store.record_answer("main", now - day * 86400 + hour_offset * 3600)
        assert await store.flush()
        assert await store.busiest_hours("main", now) == (19, 22)
        assert await store.busiest_hours("quiet", now) is None
        for _ in range(200):
            await store.record_answer("main", now - 86400 - 12 * 3600)  # 10:00 yesterday, very busy
        assert await store.flush()
        assert await store.busiest_hours("main", now) == (19, 22)  # worked out once per hour
        assert await store.busiest_hours("main", now + 3600) == (9, 12)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


# -- secrets at rest ---------------------------------------------------------------

INBOUND_SECRET = "in-Pa55word-7f3a"
REGISTRATION_SECRET = "reg-Pa55word-91c2"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The usual umask 022: what we create must be private anyway."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def secret_forms(secret: str) -> list[bytes]:
    """The secret and its unsalted hashes: none may be in a copied file."""
    forms = [secret.encode(), secret.encode("utf-16-le"), base64.b64encode(secret.encode())]
    for algorithm in ("md5", "sha1", "sha256"):
        digest = hashlib.new(algorithm, secret.encode())
        forms += [digest.hexdigest().encode(), digest.digest()]
    return forms


def assert_no_secret(data_dir: Path, *secrets: str) -> None:
    files = [p for p in data_dir.iterdir() if p.is_file()]
    assert any(p.name == DB_NAME for p in files)
    for path in files:
        content = path.read_bytes()
        for secret in secrets:
            assert not any(form in content for form in secret_forms(secret)), f"a password in {path.name}"


async def test_new_data_dir_and_every_database_file_are_private(tmp_path: Path, open_umask: None) -> None:
    data_dir = tmp_path / "data"
    s = await Storage.open(data_dir)
    await s.record_call("main", T0, 1.0, 2.0, True)
    assert mode(data_dir) == 0o700
    assert {p.name: mode(p) for p in data_dir.iterdir()} == {name: 0o600 for name in DB_FILES[:3]}
    await s.close()
    # A later writer (the CLI after the server stopped) creates the -wal and -shm afresh: private too.
    assert not (data_dir / f"{DB_NAME}-wal").exists()
    s = await Storage.open(data_dir)
    await s.add("trunks", "reg", {"registration": {"registrar": "sip:r.example.net", "password": REGISTRATION_SECRET}})
    assert {p.name: mode(p) for p in data_dir.iterdir()} == {name: 0o600 for name in (*DB_FILES[:3], KEY_FILE_NAME)}
    await s.close()


async def test_existing_open_data_dir_and_files_are_made_private(tmp_path: Path, open_umask: None) -> None:
    """A data dir from an older version: 0755, and a database in use whose files are 0644."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    older = sqlite3.connect(data_dir / DB_NAME, isolation_level=None)
    try:
        older.execute("PRAGMA journal_mode=WAL")
        older.execute("CREATE TABLE t (x)")
        older.execute("INSERT INTO t VALUES (1)")
        before = {p.name: mode(p) for p in data_dir.iterdir()}
        assert before == {name: 0o644 for name in DB_FILES[:3]} and mode(data_dir) == 0o755
        s = await Storage.open(data_dir)
        await s.record_call("main", T0, 1.0, 2.0, True)
        assert mode(data_dir) == 0o700
        assert {p.name: mode(p) for p in data_dir.iterdir()} == {name: 0o600 for name in DB_FILES[:3]}
        await s.close()
    finally:
        older.close()


@contextlib.asynccontextmanager
async def provisioned(data_dir: Path) -> AsyncIterator[Provisioning]:
    config = Config(storage=StorageConfig(data_dir=str(data_dir)))
    s = await Storage.open(data_dir, config.storage.key_file)
    try:
        yield Provisioning(config, s)
    finally:
        await s.close()


async def test_a_copied_database_reveals_no_password(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with provisioned(data_dir) as p:
        await p.add_trunk("sbc", TrunkChanges(sources=("192.0.2.9",), username="sbc", password=INBOUND_SECRET))
        await p.add_trunk(
            "reg", TrunkChanges(registrar="sip:r.example.net", register_username="u", register_password=REGISTRATION_SECRET)
        )
        # While the server has it open, the rows are still in the -wal file: both are searched.
        assert_no_secret(data_dir, INBOUND_SECRET, REGISTRATION_SECRET)
        assert (await p.trunk("sbc")).ha1["SHA-256"] == digest_ha1("SHA-256", "sbc", "voiceline", INBOUND_SECRET)
        registration = (await p.trunk("reg")).registration
        assert registration is not None and registration.password == REGISTRATION_SECRET  # read back through the key
    assert_no_secret(data_dir, INBOUND_SECRET, REGISTRATION_SECRET)
    # The database copied without the key file: the registration password cannot be opened.
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(data_dir / DB_NAME, copy / DB_NAME)
    async with provisioned(copy) as stolen:
        with pytest.raises(StorageError, match="cannot decrypt the registration password of trunk 'reg'.*missing"):
            await stolen.storage.records("trunks")
    # Nor with another key.
    (copy / KEY_FILE_NAME).write_text(os.urandom(32).hex() + "\n")
    async with provisioned(copy) as stolen:
        with pytest.raises(StorageError, match="does not open it"):
            await stolen.storage.records("trunks")


async def test_key_file_can_live_outside_the_data_dir(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "voiceline.key"
    key_file.parent.mkdir()
    s = await Storage.open(tmp_path / "data", key_file)
    try:
        await s.add("trunks", "reg", {"registration": {"registrar": "sip:r.example.net", "password": REGISTRATION_SECRET}})
        [row] = await s.records("trunks")
    finally:
        await s.close()
    assert row["settings"]["registration"]["password"] == REGISTRATION_SECRET
    assert mode(key_file) == 0o600 and not (tmp_path / "data" / KEY_FILE_NAME).exists()


# What `trunk add` stored before migration 4: both passwords in the clear.
OLD_TRUNKS = {
    "sbc": {
        "transports": ["udp"], "sources": ["192.0.2.9"], "username": "sbc", "password": INBOUND_SECRET, "realm": "vl",
        "auth_algorithms": ["SHA-256", "MD5"], "registration": None, "codecs": [], "max_calls": 0,
    },
    "reg": {
        "transports": ["udp"], "sources": [], "username": "", "password": "", "realm": "voiceline",
        "auth_algorithms": ["SHA-256", "MD5"], "codecs": [], "max_calls": 0,
        "registration": {"registrar": "sip:r.example.net", "username": "u", "password": REGISTRATION_SECRET,
                         "realm": "", "expiry": 600, "contact_user": ""},
    },
    "broken": {"sources": ["not an address"], "username": "x", "password": INBOUND_SECRET},
}  # fmt: skip


async def test_migration_turns_stored_passwords_into_hashes_and_ciphertext(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "data"
    with monkeypatch.context() as before:
        before.setattr(storage, "MIGRATIONS", storage.MIGRATIONS[:3])
        s = await Storage.open(data_dir)
        for name, settings in OLD_TRUNKS.items():
            await s.add("trunks", name, settings)
        await s.close()
    assert INBOUND_SECRET.encode() in (data_dir / DB_NAME).read_bytes()  # what there was to convert
    async with provisioned(data_dir) as p:
        assert query(data_dir / DB_NAME, "SELECT version FROM schema_version") == [(len(storage.MIGRATIONS),)]
        assert_no_secret(data_dir, INBOUND_SECRET, REGISTRATION_SECRET)
        loaded = await load(p.config, p.storage)
    trunks = {t.name: t for t in loaded.trunks}
    assert trunks["sbc"].ha1 == {a: digest_ha1(a, "sbc", "vl", INBOUND_SECRET) for a in ("SHA-256", "MD5")}
    assert trunks["reg"].registration is not None and trunks["reg"].registration.password == REGISTRATION_SECRET
    assert loaded.shadowed == ["trunk broken (invalid)"]
    assert_no_secret(data_dir, INBOUND_SECRET, REGISTRATION_SECRET)
