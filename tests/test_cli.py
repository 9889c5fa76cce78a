"""`voiceline serve` flags, config files and signals, run as a real process."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from port_table import port_block
from voiceline import config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def voiceline(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "voiceline", *args], capture_output=True, text=True, timeout=timeout)


def test_shipped_default_config_matches_embedded_defaults() -> None:
    assert config.load(ROOT / "config" / "voiceline.toml") == config.Config()


@pytest.mark.parametrize(
    "flags",
    [
        ["--listen", "bogus"],
        ["--listen", "127.0.0.1:99999"],
        ["--listen", "example.com:5060"],
        ["--rtp-ports", "30000-20000"],
        ["--rtp-ports", "abc"],
        ["--log-format", "xml"],
        ["--no-such-flag"],
    ],
)
def test_bad_flags_give_one_line_and_exit_2(flags: list[str]) -> None:
    result = voiceline("serve", *flags)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "error" in result.stderr


@pytest.mark.parametrize(
    "text",
    [
        "[sip\nlisten = 1",
        "[sip]\nlisten = 5060\n",
        "[sip]\nno_such_key = 1\n",
        "[nosection]\n",
        "[media]\ncodecs = ['G729']\n",
        "[sip]\nanswer_delay = -1\n",
        "[media]\nrealtime_priority = 100\n",
    ],
)
def test_bad_config_file_gives_one_line_and_exit_2(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = voiceline("serve", "--config", str(path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "config error" in result.stderr


def test_missing_config_file_exit_2(tmp_path: Path) -> None:
    result = voiceline("serve", "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2 and "cannot read config file" in result.stderr


def test_flags_override_the_file_and_sigint_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "voiceline.toml"
    path.write_text('[sip]\nlisten = "127.0.0.1:1"\n[log]\nformat = "console"\n')
    process = subprocess.Popen(
        [
            sys.executable, "-m", "voiceline", "serve", "--config", str(path),
            "--listen", "127.0.0.1:0", "--rtp-ports", "{}-{}".format(*port_block("test_cli")),
            "--data-dir", str(tmp_path / "data"), "--log-format", "json",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert process.stdout is not None
        first = json.loads(process.stdout.readline())
        assert first["event"] == "sip.listening" and first["address"].startswith("127.0.0.1:")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
        assert (tmp_path / "data" / "voiceline.db").exists()
    finally:
        process.kill()
        process.wait()


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = voiceline("serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 9 and "cannot start" in result.stderr and "already in use" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_drain_without_a_running_service_says_so_and_exits_1(tmp_path: Path) -> None:
    result = voiceline("drain", "--data-dir", str(tmp_path))
    assert result.returncode == 1 and "no running service" in result.stderr
    (tmp_path / "voiceline.pid").write_text("not a pid\n")
    assert voiceline("drain", "--data-dir", str(tmp_path)).returncode == 1
