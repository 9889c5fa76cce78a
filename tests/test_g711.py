import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from voiceline.audio import g711

ALL_SAMPLES = np.arange(-32768, 32768).astype(np.int16)
ALL_CODES = bytes(range(256))
LAWS = [
    pytest.param(g711.ulaw_encode, g711.ulaw_decode, id="ulaw"),
    pytest.param(g711.alaw_encode, g711.alaw_decode, id="alaw"),
]


@pytest.mark.parametrize(
    ("encode", "decode", "pcm", "code"),
    [
        (g711.ulaw_encode, g711.ulaw_decode, 0, 0xFF),
        (g711.ulaw_encode, g711.ulaw_decode, -32124, 0x00),
        (g711.ulaw_encode, g711.ulaw_decode, 32124, 0x80),
        (g711.ulaw_encode, g711.ulaw_decode, -8, 0x7E),
        (g711.alaw_encode, g711.alaw_decode, 8, 0xD5),
        (g711.alaw_encode, g711.alaw_decode, -8, 0x55),
        (g711.alaw_encode, g711.alaw_decode, 32256, 0xAA),
        (g711.alaw_encode, g711.alaw_decode, -32256, 0x2A),
    ],
)
def test_known_code_points(encode, decode, pcm, code):
    assert encode(np.array([pcm], dtype=np.int16)) == bytes([code])
    assert decode(bytes([code])).tolist() == [pcm]


def test_extremes_clip_to_the_largest_codes():
    extremes = np.array([32767, -32768], dtype=np.int16)
    assert g711.ulaw_encode(extremes) == b"\x80\x00"
    assert g711.alaw_encode(extremes) == b"\xaa\x2a"


def test_ulaw_negative_zero_decodes_to_zero():
    assert g711.ulaw_decode(b"\x7f").tolist() == [0]


@pytest.mark.parametrize(("encode", "decode"), LAWS)
def test_round_trip_error_is_within_one_quantisation_step(encode, decode):
    restored = decode(encode(ALL_SAMPLES)).astype(np.int32)
    original = ALL_SAMPLES.astype(np.int32)
    error = np.abs(restored - original)
    in_range = np.abs(original) <= 32000  # beyond the largest code the error is clipping
    assert np.all(error[in_range] <= np.abs(original[in_range]) / 32 + 8)
    assert error.max() <= 32768 - 32124


@pytest.mark.parametrize(("encode", "decode"), LAWS)
def test_decode_then_encode_is_identity_for_every_code(encode, decode):
    restored = encode(decode(ALL_CODES))
    differing = [code for code in ALL_CODES if restored[code] != code]
    assert differing in ([], [0x7F])  # mu-law's negative zero comes back as positive zero


@pytest.mark.parametrize(("encode", "decode"), LAWS)
def test_decode_is_monotonic_in_the_sample_value(encode, decode):
    values = decode(encode(ALL_SAMPLES)).astype(np.int32)
    assert np.all(np.diff(values) >= 0)


def test_transcode_tables_equal_decode_then_encode():
    assert g711.ULAW_TO_ALAW == g711.alaw_encode(g711.ulaw_decode(ALL_CODES))
    assert g711.ALAW_TO_ULAW == g711.ulaw_encode(g711.alaw_decode(ALL_CODES))
    assert len(g711.ULAW_TO_ALAW) == len(g711.ALAW_TO_ULAW) == 256


@given(st.binary(max_size=400))
def test_translate_matches_decode_then_encode(payload):
    assert payload.translate(g711.ULAW_TO_ALAW) == g711.alaw_encode(g711.ulaw_decode(payload))
    assert payload.translate(g711.ALAW_TO_ULAW) == g711.ulaw_encode(g711.alaw_decode(payload))


@given(st.lists(st.integers(-32768, 32767), max_size=400))
def test_encode_gives_one_byte_per_sample(samples):
    pcm = np.array(samples, dtype=np.int16)
    for codec in g711.CODECS:
        data = g711.encoder(codec)(pcm)
        assert len(data) == len(samples)
        assert g711.decoder(codec)(data).dtype == np.int16


def test_other_dtypes_are_rounded_and_clipped():
    assert g711.ulaw_encode(np.array([1e9, -1e9, 0.4])) == g711.ulaw_encode(
        np.array([32767, -32768, 0], dtype=np.int16)
    )


def test_lookup_by_codec_name():
    assert g711.encoder("PCMU") is g711.ulaw_encode
    assert g711.decoder("PCMA") is g711.alaw_decode
    assert g711.translation("PCMU", "PCMA") is g711.ULAW_TO_ALAW
    assert g711.translation("PCMA", "PCMU") is g711.ALAW_TO_ULAW
    assert g711.translation("PCMA", "PCMA") is None


@pytest.mark.parametrize(
    "lookup",
    [
        lambda: g711.encoder("G722"),
        lambda: g711.decoder("pcmu"),
        lambda: g711.translation("PCMU", "opus"),
        lambda: g711.translation("L16", "L16"),
    ],
)
def test_unknown_codecs_are_rejected(lookup):
    with pytest.raises(ValueError, match="unsupported codec"):
        lookup()
