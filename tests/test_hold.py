import wave
from pathlib import Path

import numpy as np
import pytest

from voiceline.audio import g711
from voiceline.audio.hold import (
    CHIME_HZ,
    CYCLE_SECONDS,
    PAD_HZ,
    SAMPLE_RATE,
    chime_pattern,
    encode_frames,
    load_wav,
)
from voiceline.codec_table import PCMA, PCMU

DTMF_AND_TEST_TONES_HZ = (697, 770, 852, 941, 1209, 1336, 1477)


def band_energy(samples: np.ndarray, rate: int, centre: float, half_width: float) -> float:
    """Fraction of the signal's energy within `half_width` Hz of `centre`."""
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64))) ** 2
    frequencies = np.fft.rfftfreq(len(samples), 1 / rate)
    return float(spectrum[np.abs(frequencies - centre) <= half_width].sum() / spectrum.sum())


def write_wav(path: Path, samples: np.ndarray, rate: int, channels: int = 1, width: int = 2) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(samples.tobytes())
    return path


def tone(frequency: float, seconds: float, rate: int, amplitude: float = 8000.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.rint(amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.int16)


# -- the chime pattern -----------------------------------------------------------


def test_pattern_is_one_cycle_of_int16_peaking_near_minus_16_dbfs():
    pattern = chime_pattern()
    assert pattern.dtype == np.int16
    assert len(pattern) == int(CYCLE_SECONDS * SAMPLE_RATE)
    peak_dbfs = 20 * np.log10(np.max(np.abs(pattern.astype(np.int32))) / 32767)
    assert -17 < peak_dbfs < -15


def test_pattern_is_never_silent_for_a_second():
    looped = np.tile(chime_pattern(), 3).astype(np.float64)
    window = SAMPLE_RATE
    rms = [np.sqrt(np.mean(looped[s : s + window] ** 2)) for s in range(0, len(looped) - window, 160)]
    assert min(rms) > 100  # about -50 dBFS: soft, but clearly there


def test_pattern_has_quiet_between_chimes():
    pattern = chime_pattern().astype(np.float64)
    loudest = np.max(np.abs(pattern))
    last_half_second = pattern[-SAMPLE_RATE // 2 :]
    assert np.max(np.abs(last_half_second)) < loudest / 4


def test_pattern_loops_without_a_click():
    pattern = chime_pattern().astype(np.int32)
    largest_step = np.max(np.abs(np.diff(pattern)))
    assert abs(pattern[0] - pattern[-1]) <= largest_step


def test_tones_keep_away_from_dtmf():
    for frequency in (*CHIME_HZ, PAD_HZ):
        assert min(abs(frequency - dtmf) for dtmf in DTMF_AND_TEST_TONES_HZ) >= 60


def test_energy_is_at_the_chime_frequencies_not_the_dtmf_ones():
    pattern = chime_pattern()
    near_tones = sum(band_energy(pattern, SAMPLE_RATE, f, 25) for f in (*CHIME_HZ, PAD_HZ))
    assert near_tones > 0.95
    for dtmf in DTMF_AND_TEST_TONES_HZ:
        assert band_energy(pattern, SAMPLE_RATE, dtmf, 20) < 1e-4


def test_pattern_at_another_rate_has_the_same_duration():
    assert len(chime_pattern(16000)) == int(CYCLE_SECONDS * 16000)


# -- WAV files ---------------------------------------------------------------------


def test_mono_8k_wav_loads_unchanged(tmp_path):
    samples = tone(440, 0.5, 8000)
    assert np.array_equal(load_wav(write_wav(tmp_path / "a.wav", samples, 8000)), samples)


def test_stereo_44k1_wav_is_mixed_and_resampled(tmp_path):
    left = tone(1000, 1.0, 44100)
    right = tone(1000, 1.0, 44100, amplitude=4000)
    stereo = np.column_stack([left, right]).ravel()
    loaded = load_wav(write_wav(tmp_path / "s.wav", stereo, 44100, channels=2))
    assert loaded.dtype == np.int16
    assert len(loaded) == 8000
    assert band_energy(loaded, 8000, 1000, 15) > 0.99
    middle = loaded[1000:7000].astype(np.float64)  # away from the filter's edges
    assert 5500 < np.max(np.abs(middle)) < 6500  # (8000 + 4000) / 2


def test_high_rate_wav_does_not_alias(tmp_path):
    # 5 kHz cannot be carried at 8 kHz; plain decimation would fold it to 3 kHz.
    loaded = load_wav(write_wav(tmp_path / "h.wav", tone(5000, 1.0, 48000), 48000))
    assert np.sqrt(np.mean(loaded[200:-200].astype(np.float64) ** 2)) < 8000 / np.sqrt(2) * 0.05


def test_low_rate_wav_is_upsampled(tmp_path):
    loaded = load_wav(write_wav(tmp_path / "l.wav", tone(500, 1.0, 4000), 4000))
    assert len(loaded) == 8000
    assert band_energy(loaded, 8000, 500, 15) > 0.99


def _eight_bit(path: Path) -> Path:
    return write_wav(path, np.full(800, 128, dtype=np.uint8), 8000, width=1)


def _three_channels(path: Path) -> Path:
    return write_wav(path, np.zeros(2400, dtype=np.int16), 8000, channels=3)


def _no_frames(path: Path) -> Path:
    return write_wav(path, np.zeros(0, dtype=np.int16), 8000)


def _not_a_wav(path: Path) -> Path:
    path.write_bytes(b"ID3\x03 this is an mp3, honestly")
    return path


def _truncated_header(path: Path) -> Path:
    path.write_bytes(write_wav(path, tone(440, 0.1, 8000), 8000).read_bytes()[:30])
    return path


@pytest.mark.parametrize("make", [_eight_bit, _three_channels, _no_frames, _not_a_wav, _truncated_header])
def test_unsupported_files_raise_one_fixed_message(tmp_path, make):
    with pytest.raises(ValueError) as raised:
        load_wav(make(tmp_path / "bad.wav"))
    assert str(raised.value) == "hold audio must be a non-empty 16-bit PCM WAV file, mono or stereo"


# -- frames ------------------------------------------------------------------------


@pytest.mark.parametrize("codec", [PCMU, PCMA])
def test_encode_frames_cuts_20ms_payloads_and_pads_the_last(codec):
    pcm = tone(440, 0.05, 8000)  # 400 samples: two full frames and half of one
    frames = encode_frames(pcm, codec)
    assert [len(frame) for frame in frames] == [160, 160, 160]
    assert b"".join(frames)[:400] == g711.encoder(codec.name)(pcm)
    assert np.all(np.abs(g711.decoder(codec.name)(frames[-1][80:])) <= 8)  # silence (A-law has no exact zero)


def test_encode_frames_of_the_chime_cover_the_cycle():
    frames = encode_frames(chime_pattern(), PCMU)
    assert len(frames) == int(CYCLE_SECONDS * 50)


def test_encode_frames_with_other_frame_sizes():
    assert [len(frame) for frame in encode_frames(np.zeros(500, dtype=np.int16), PCMA, 240)] == [240, 240, 240]
    assert encode_frames(np.zeros(0, dtype=np.int16), PCMU) == []
