"""ITU-T G.711 mu-law (PCMU) and A-law (PCMA), vectorised with lookup tables.

Every table is built once at import: encoding indexes a 65536-entry table by
the raw 16-bit sample, decoding a 256-entry table by the code. The two
transcoding tables are `bytes.translate` tables, so switching a relayed
payload between PCMU and PCMA is one C call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np

CODECS = ("PCMU", "PCMA")
RATE = 8000  # both laws sample at 8 kHz

# Upper bounds of the eight segments, on the magnitudes the reference
# algorithm works with (14-bit for mu-law, 13-bit for A-law).
_ULAW_SEGMENT_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEGMENT_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
_ULAW_BIAS = 0x84
_ULAW_CLIP = 8159


def _every_sample() -> np.ndarray:
    """All 65536 int16 values, ordered by their unsigned bit pattern (the encode table index)."""
    return np.arange(1 << 16, dtype=np.uint16).view(np.int16).astype(np.int32)


def _ulaw_encode_table() -> np.ndarray:
    value = _every_sample() >> 2
    mask = np.where(value < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(value), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    segment = np.searchsorted(_ULAW_SEGMENT_END, magnitude)
    code = np.where(segment >= 8, 0x7F, (segment << 4) | ((magnitude >> (segment + 1)) & 0x0F))
    return (code ^ mask).astype(np.uint8)


def _alaw_encode_table() -> np.ndarray:
    value = _every_sample() >> 3
    mask = np.where(value >= 0, 0xD5, 0x55)
    magnitude = np.where(value >= 0, value, -value - 1)  # at most 0xFFF: always within segment 7
    segment = np.searchsorted(_ALAW_SEGMENT_END, magnitude)
    code = (segment << 4) | ((magnitude >> np.maximum(segment, 1)) & 0x0F)
    return (code ^ mask).astype(np.uint8)


def _ulaw_decode_table() -> np.ndarray:
    code = ~np.arange(256) & 0xFF
    magnitude = (((code & 0x0F) << 3) + _ULAW_BIAS) << ((code & 0x70) >> 4)
    return np.where(code & 0x80, _ULAW_BIAS - magnitude, magnitude - _ULAW_BIAS).astype(np.int16)


def _alaw_decode_table() -> np.ndarray:
    code = np.arange(256) ^ 0x55
    mantissa = (code & 0x0F) << 4
    segment = (code & 0x70) >> 4
    magnitude = np.where(segment == 0, mantissa + 8, (mantissa + 0x108) << np.maximum(segment - 1, 0))
    return np.where(code & 0x80, magnitude, -magnitude).astype(np.int16)


_ULAW_ENCODE = _ulaw_encode_table()
_ALAW_ENCODE = _alaw_encode_table()
_ULAW_DECODE = _ulaw_decode_table()
_ALAW_DECODE = _alaw_decode_table()


def _as_int16(pcm: np.ndarray) -> np.ndarray:
    pcm = np.asarray(pcm)
    if pcm.dtype == np.int16:
        return pcm
    return np.clip(np.rint(pcm), -32768, 32767).astype(np.int16)


def ulaw_encode(pcm: np.ndarray) -> bytes:
    """Encode 16-bit samples (other dtypes are rounded and clipped) as mu-law."""
    return _ULAW_ENCODE[_as_int16(pcm).view(np.uint16)].tobytes()


def alaw_encode(pcm: np.ndarray) -> bytes:
    """Encode 16-bit samples (other dtypes are rounded and clipped) as A-law."""
    return _ALAW_ENCODE[_as_int16(pcm).view(np.uint16)].tobytes()


def ulaw_decode(data: bytes) -> np.ndarray:
    return _ULAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


def alaw_decode(data: bytes) -> np.ndarray:
    return _ALAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


ULAW_TO_ALAW: bytes = alaw_encode(_ULAW_DECODE)
ALAW_TO_ULAW: bytes = ulaw_encode(_ALAW_DECODE)

_ENCODERS: dict[str, Callable[[np.ndarray], bytes]] = {"PCMU": ulaw_encode, "PCMA": alaw_encode}
_DECODERS: dict[str, Callable[[bytes], np.ndarray]] = {"PCMU": ulaw_decode, "PCMA": alaw_decode}
_DECODE_TABLES: dict[str, np.ndarray] = {"PCMU": _ULAW_DECODE, "PCMA": _ALAW_DECODE}
_TRANSLATIONS: dict[tuple[str, str], bytes] = {("PCMU", "PCMA"): ULAW_TO_ALAW, ("PCMA", "PCMU"): ALAW_TO_ULAW}

_K = TypeVar("_K")
_V = TypeVar("_V")


def _lookup(table: Mapping[_K, _V], key: _K) -> _V:
    try:
        return table[key]
    except KeyError:
        raise ValueError("unsupported codec: expected PCMU or PCMA") from None


def encoder(codec: str) -> Callable[[np.ndarray], bytes]:
    """The encoder for an SDP encoding name ("PCMU" or "PCMA")."""
    return _lookup(_ENCODERS, codec)


def decoder(codec: str) -> Callable[[bytes], np.ndarray]:
    """The decoder for an SDP encoding name ("PCMU" or "PCMA")."""
    return _lookup(_DECODERS, codec)


def decode_table(codec: str, dtype: type[np.generic] = np.int16) -> np.ndarray:
    """The sample of each of the 256 codes (decode many frames at once by indexing it), as `dtype`."""
    table = _lookup(_DECODE_TABLES, codec)
    if dtype is np.int16:
        return table
    converted = _CONVERTED.get((codec, dtype))
    if converted is None:
        converted = _CONVERTED[(codec, dtype)] = table.astype(dtype)
    return converted


_CONVERTED: dict[tuple[str, type[np.generic]], np.ndarray] = {}


def translation(source: str, target: str) -> bytes | None:
    """The `bytes.translate` table from one codec to another; None when they are the same."""
    if source == target:
        _lookup(_ENCODERS, source)
        return None
    return _lookup(_TRANSLATIONS, (source, target))
