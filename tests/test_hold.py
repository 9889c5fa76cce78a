import wave
from pathlib import Path

import numpy as np
import pytest

from voiceline.audio import g711
from voiceline.audio.hold import (
    EncodedLoop,
    AVOIDED_HZ,
    LOOP_SECONDS,
    PAD_HZ,
    SAMPLE_RATE,
    encode_frames,
    hold_music,
    load_wav,
    ringback,
)
from voiceline.codec_table import PCMA, PCMU, lookup
from voiceline.sim.analysis import goertzel_db

DTMF_AND_TEST_TONES_HZ = (697, 770, 852, 941, 1209, 1336, 1477, 1000, 1500)


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


def dbfs(level: float) -> float:
    return float(20 * np.log10(level / 32767))


def windowed_rms(samples: np.ndarray, window: int, step: int) -> np.ndarray:
    floats = samples.astype(np.float64)
    return np.array([np.sqrt(np.mean(floats[s : s + window] ** 2)) for s in range(0, len(floats) - window, step)])


# -- the built-in music ------------------------------------------------------------


def test_music_is_one_long_loop_of_int16():
    music = hold_music()
    assert music.dtype == np.int16
    assert 30 <= LOOP_SECONDS <= 60
    assert len(music) == int(LOOP_SECONDS * SAMPLE_RATE)


def test_no_stretch_repeats_before_the_loop_does():
    # The old chime repeated every 3 s exactly (autocorrelation 1.0 there). Circular, as it is played.
    music = hold_music().astype(np.float64)
    power = np.abs(np.fft.rfft(music)) ** 2
    correlation = np.fft.irfft(power, len(music))
    correlation /= correlation[0]
    lags = np.arange(len(music))
    away_from_zero = (lags >= SAMPLE_RATE) & (lags <= len(music) - SAMPLE_RATE)
    assert np.max(correlation[away_from_zero]) < 0.75
    assert correlation[3 * SAMPLE_RATE] < 0.5


def test_level_is_soft_and_steady_well_below_speech():
    music = hold_music()
    peak = dbfs(np.max(np.abs(music.astype(np.int32))))
    overall = dbfs(np.sqrt(np.mean(music.astype(np.float64) ** 2)))
    assert -21 < peak < -19
    assert -36 < overall < -28  # prompts speak at about -20 dBFS over it
    quietest = dbfs(np.min(windowed_rms(np.tile(music, 2), SAMPLE_RATE // 10, SAMPLE_RATE // 50)))
    assert quietest > -45  # never silent, even for 100 ms: the line is plainly alive


def worst_click(samples: np.ndarray, window: int = SAMPLE_RATE // 20) -> float:
    """The largest share of a 50 ms window's energy above the telephone band (3.4-4 kHz).
    The music has none there; a click (any sudden step) spreads energy over every frequency."""
    worst = 0.0
    for start in range(0, len(samples) - window, window // 2):
        spectrum = np.abs(np.fft.rfft(samples[start : start + window] * np.hanning(window))) ** 2
        above = spectrum[np.fft.rfftfreq(window, 1 / SAMPLE_RATE) > 3400].sum()
        worst = max(worst, float(above / spectrum.sum()))
    return worst


def test_no_click_anywhere_nor_at_the_loop_seam():
    music = hold_music().astype(np.float64)
    assert worst_click(np.tile(music, 2)) < 1e-6  # two loops: notes starting, ending, and the seam
    # The check sees a click: a step of 5 % of the peak.
    stepped = music + np.where(np.arange(len(music)) > len(music) // 2, 0.05 * np.max(np.abs(music)), 0.0)
    assert worst_click(stepped) > 1e-6


def test_music_stays_in_the_telephone_band():
    music = hold_music()
    assert band_energy(music, SAMPLE_RATE, 1850, 1550) > 0.999  # 300-3400 Hz


def test_music_keeps_clear_of_dtmf_and_test_tones():
    music = hold_music()
    for frequency in DTMF_AND_TEST_TONES_HZ:
        assert frequency in AVOIDED_HZ
        assert band_energy(music, SAMPLE_RATE, frequency, 20) < 1e-4


def test_the_pedal_sounds_throughout():
    music = hold_music()
    for second in range(int(LOOP_SECONDS)):
        window = music[second * SAMPLE_RATE : (second + 1) * SAMPLE_RATE]
        assert band_energy(window, SAMPLE_RATE, PAD_HZ, 3) > 0.05


def test_music_at_another_rate_has_the_same_duration():
    assert len(hold_music(16000)) == int(LOOP_SECONDS * 16000)


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


def test_encode_frames_of_the_music_cover_the_loop():
    frames = encode_frames(hold_music(), PCMU)
    assert len(frames) == int(LOOP_SECONDS * 50)


def test_encode_frames_with_other_frame_sizes():
    assert [len(frame) for frame in encode_frames(np.zeros(500, dtype=np.int16), PCMA, 240)] == [240, 240, 240]
    assert encode_frames(np.zeros(0, dtype=np.int16), PCMU) == []


def test_hold_audio_is_encoded_as_it_is_first_played():
    """A long loop in a costly codec is encoded a frame per tick, never all at once on the event loop."""
    opus = lookup("OPUS")
    loop = EncodedLoop(hold_music(), opus)
    assert len(loop) == int(LOOP_SECONDS * 50)
    first_two = [loop[0], loop[1]]
    assert len(loop._frames) == 2  # nothing beyond what was played
    assert first_two + [loop[2]] == encode_frames(hold_music()[: 3 * 160], opus)
    with pytest.raises(IndexError):
        loop[len(loop)]


def test_the_ringing_tone_rings_for_its_on_time_of_every_period() -> None:
    loop = ringback((425.0,), 1.0, 5.0)
    assert len(loop) == 5 * SAMPLE_RATE and not loop.flags.writeable
    ringing, quiet = loop[: SAMPLE_RATE].astype(np.float64), loop[SAMPLE_RATE:].astype(np.float64)
    assert goertzel_db(ringing, SAMPLE_RATE, 425.0) > goertzel_db(ringing, SAMPLE_RATE, 1000.0) + 40
    assert goertzel_db(ringing, SAMPLE_RATE, 425.0) > -20
    assert not quiet.any()  # silence for the rest of the period
    two = ringback((400.0, 450.0), 0.4, 3.0)  # UK-style: two frequencies together
    levels = [goertzel_db(two[: int(0.4 * SAMPLE_RATE)].astype(np.float64), SAMPLE_RATE, hz) for hz in (400.0, 450.0, 425.0)]
    assert min(levels[:2]) > levels[2] + 10, levels
    assert ringback((425.0,), 1.0, 5.0) is loop  # made once, shared
