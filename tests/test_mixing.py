"""Jitter buffer, loss concealment and prompt mixing, sans-I/O."""

from __future__ import annotations

import numpy as np

from voiceline.audio.mixing import (
    CONCEALED_FRAMES,
    DUCK_DB,
    DUCK_RAMP_SECONDS,
    FADE_SECONDS,
    MAX_FRAMES,
    PREFILL_FRAMES,
    JitterBuffer,
    Prompt,
)

FRAME = 160


def ramp(first: int, count: int) -> np.ndarray:
    return np.arange(first, first + count, dtype=np.int16)


def test_playout_waits_for_the_prefill_then_keeps_order() -> None:
    buffer = JitterBuffer(FRAME)
    buffer.push(ramp(1, FRAME))
    assert not np.any(buffer.pop())  # one frame is not enough to start
    buffer.push(ramp(1 + FRAME, FRAME))
    assert np.array_equal(buffer.pop(), ramp(1, FRAME))
    assert np.array_equal(buffer.pop(), ramp(1 + FRAME, FRAME))


def test_30_ms_packets_come_out_as_20_ms_frames_without_losing_a_sample() -> None:
    buffer = JitterBuffer(FRAME)
    out = []
    for packet in range(8):  # 8 x 240 samples = 12 frames of 160
        buffer.push(ramp(1 + 240 * packet, 240))
        out.append(buffer.pop())
        if packet % 2:
            out.append(buffer.pop())
    played = np.concatenate(out)
    audio = played[np.nonzero(played)[0][0] :]
    assert np.array_equal(audio[: 240 * 8 - 2 * FRAME], ramp(1, 240 * 8 - 2 * FRAME))


def test_a_lost_frame_is_concealed_by_the_last_one_fading_then_silence() -> None:
    buffer = JitterBuffer(FRAME)
    frame = np.full(FRAME, 8000, dtype=np.int16)
    buffer.push(frame)
    buffer.push(frame)
    buffer.pop()
    buffer.pop()
    levels = [int(np.max(np.abs(buffer.pop()))) for _ in range(CONCEALED_FRAMES + 2)]
    assert levels == [4000, 2000, 1000, 0, 0]
    assert buffer.concealed_frames == CONCEALED_FRAMES


def test_depth_is_bounded_by_dropping_the_oldest_audio() -> None:
    buffer = JitterBuffer(FRAME)
    buffer.push(ramp(0, FRAME * (MAX_FRAMES + 4)))
    first = buffer.pop()
    assert first[0] == 4 * FRAME  # delay never grows past MAX_FRAMES
    assert PREFILL_FRAMES <= MAX_FRAMES


RATE = 8000


def play(prompt: Prompt, under: np.ndarray) -> np.ndarray:
    """Mix `prompt` over `under` frame by frame until it is done; the frames played, joined."""
    frames = []
    for start in range(0, len(under), FRAME):
        if prompt.done:
            break
        frames.append(prompt.mix(under[start : start + FRAME]))
    assert prompt.done
    return np.concatenate(frames)


def sine(hz: float, samples: int, amplitude: float) -> np.ndarray:
    return np.rint(amplitude * np.sin(2 * np.pi * hz * np.arange(samples) / RATE)).astype(np.int16)


def level(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))


def test_prompt_runs_its_own_length_and_the_sum_saturates() -> None:
    prompt = Prompt(np.full(10 * FRAME + 40, 30000, dtype=np.int16), FRAME)
    mixed = play(prompt, np.full(20 * FRAME, 20000, dtype=np.int16))
    assert len(mixed) == 11 * FRAME  # the last frame partly prompt
    middle = mixed[5 * FRAME : 6 * FRAME]
    assert np.all(middle == 32767)  # 30000 + 20000 ducked to 5000: clipped, not wrapped round
    negative = Prompt(np.full(10 * FRAME, -30000, dtype=np.int16), FRAME)
    assert np.all(play(negative, np.full(10 * FRAME, -20000, dtype=np.int16))[5 * FRAME : 6 * FRAME] == -32768)


def test_audio_under_a_prompt_ducks_by_12_db_and_comes_back() -> None:
    under = sine(440, 40 * FRAME, 8000)
    mixed = play(Prompt(np.zeros(40 * FRAME, dtype=np.int16), FRAME), under)  # a silent prompt: only ducking
    ducked = 20 * np.log10(level(mixed[10 * FRAME : 30 * FRAME]) / level(under[10 * FRAME : 30 * FRAME]))
    assert abs(ducked - DUCK_DB) < 0.2
    assert abs(int(mixed[0]) - int(under[0])) <= 1  # starts at full level...
    assert abs(mixed[-1] / under[-1] - 1) < 0.05  # ...and ends at full level


def test_ducking_ramps_over_50_to_100_ms_without_a_step() -> None:
    under = np.full(40 * FRAME, 10000, dtype=np.int16)
    gain = play(Prompt(np.zeros(40 * FRAME, dtype=np.int16), FRAME), under) / 10000
    ramp = np.nonzero(gain <= 10 ** (DUCK_DB / 20) + 1e-3)[0][0]
    assert 0.05 * RATE <= ramp <= 0.1 * RATE
    assert DUCK_RAMP_SECONDS * RATE == ramp
    assert np.max(np.abs(np.diff(gain))) < 2 / ramp  # a gentle slope, no jump


def test_a_prompt_that_starts_and_ends_mid_wave_fades_in_and_out() -> None:
    loud = np.full(20 * FRAME, 20000, dtype=np.int16)  # a step up at the start, down at the end
    mixed = play(Prompt(loud, FRAME), np.zeros(20 * FRAME, dtype=np.int16))
    fade = round(FADE_SECONDS * RATE)
    assert abs(int(mixed[0])) < 200 and abs(int(mixed[-1])) < 200
    assert np.all(mixed[fade:-fade] == 20000)
    assert np.max(np.abs(np.diff(mixed.astype(np.int32)))) < 2 * 20000 / fade


def test_a_prompt_shorter_than_its_ramps_still_plays() -> None:
    mixed = play(Prompt(np.full(100, 1000, dtype=np.int16), FRAME), np.full(FRAME, 4000, dtype=np.int16))
    assert len(mixed) == FRAME and np.max(mixed[:100]) > 1000 and mixed[-1] == 4000
