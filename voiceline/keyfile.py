"""The key that encrypts stored registration passwords (AES-256-GCM), kept in a file of its own.

The database holds only ciphertext; the key lives in `storage.secret_key_file`
(by default `secret.key` in the data directory, created 0600 with a random key
the first time a password is stored). Kept elsewhere, a copied database alone
reveals no password. Error messages name the file, never key or plaintext.
"""

from __future__ import annotations

import base64
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_FILE_NAME = "secret.key"
KEY_BYTES = 32
NONCE_BYTES = 12
SEALED_PREFIX = "aesgcm1:"  # names the format, so a later one can sit beside it


class KeyFileError(Exception):
    """The key file is missing, unreadable or holds another key than the one a secret was sealed with."""


class KeyFile:
    """Seals and opens short secrets with the key in `path`; the key is read once and cached."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: bytes | None = None

    def __repr__(self) -> str:  # never the key
        return f"KeyFile({str(self.path)!r})"

    def seal(self, plaintext: str, context: str) -> str:
        """`plaintext` encrypted and bound to `context` (what it belongs to); creates the key file on first need."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = AESGCM(self.load(create=True)).encrypt(nonce, plaintext.encode("utf-8"), context.encode("utf-8"))
        return SEALED_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def unseal(self, sealed: str, context: str) -> str:
        if not sealed.startswith(SEALED_PREFIX):
            raise KeyFileError("not a sealed value")
        try:
            raw = base64.urlsafe_b64decode(sealed[len(SEALED_PREFIX) :])
        except ValueError:
            raise KeyFileError("not a sealed value") from None
        key = self.load(create=False)
        try:
            plain = AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode("utf-8"))
        except (InvalidTag, ValueError):
            raise KeyFileError(f"the key in {self.path} does not open it (sealed with another key?)") from None
        return plain.decode("utf-8")

    def load(self, create: bool) -> bytes:
        """The key (read once; with `create`, made when the file does not exist yet). Blocking file work."""
        if self._key is None:
            self._key = self._read() if not create or self.path.exists() else self._create()
        return self._key

    def _create(self) -> bytes:
        key = secrets.token_bytes(KEY_BYTES)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return self._read()  # another process made it first
        except OSError as exc:
            raise KeyFileError(f"cannot create key file {self.path}: {exc.strerror}") from None
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(key.hex() + "\n")
            out.flush()
            os.fsync(out.fileno())
        return key

    def _read(self) -> bytes:
        try:
            if stat.S_IMODE(self.path.stat().st_mode) & 0o077:
                self.path.chmod(0o600)  # readable by others: make it private as the database files
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            raise KeyFileError(f"key file {self.path} is missing") from None
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {self.path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            text = ""  # reported below as not holding a key
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != KEY_BYTES:
            raise KeyFileError(f"key file {self.path} does not hold a {KEY_BYTES}-byte key in hex")
        return key
