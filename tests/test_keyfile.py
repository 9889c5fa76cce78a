"""The key file sealing registration passwords: created private, bound to what it seals, loud when wrong."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from voiceline.keyfile import KeyFile, KeyFileError


def test_sealed_value_opens_only_with_its_key_and_context(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        keys = KeyFile(tmp_path / "secret.key")
        sealed = keys.seal("reg-pw", "trunk a registration password")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "secret.key").stat().st_mode) == 0o600
    assert "reg-pw" not in sealed and sealed != keys.seal("reg-pw", "trunk a registration password")  # fresh nonce
    assert KeyFile(tmp_path / "secret.key").unseal(sealed, "trunk a registration password") == "reg-pw"
    with pytest.raises(KeyFileError, match="does not open it"):
        keys.unseal(sealed, "trunk b registration password")  # moved to another trunk's row
    with pytest.raises(KeyFileError, match="not a sealed value"):
        keys.unseal("reg-pw", "trunk a registration password")
    key_text = (tmp_path / "secret.key").read_text().strip()
    assert key_text not in repr(keys)


def test_key_file_readable_by_others_is_made_private_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    KeyFile(path).seal("x", "c")
    path.chmod(0o644)
    KeyFile(path).unseal(KeyFile(path).seal("x", "c"), "c")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("not-a-key\n")
    with pytest.raises(KeyFileError, match="does not hold a 32-byte key") as info:
        KeyFile(path).unseal("aesgcm1:AAAA", "c")
    assert "not-a-key" not in str(info.value)
    with pytest.raises(KeyFileError, match="missing"):
        KeyFile(tmp_path / "absent.key").unseal("aesgcm1:AAAA", "c")
