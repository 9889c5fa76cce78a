"""Jitter buffer, loss concealment and prompt mixing, sans-I/O."""

from __future__ import annotations

import numpy as np

from voiceline.audio.mixing import CONCEALED_FRAMES, MAX_FRAMES, PREFILL_FRAMES, JitterBuffer, Prompt

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


def test_prompt_is_added_frame_by_frame_with_saturation() -> None:
    prompt = Prompt(np.full(FRAME + 40, 30000, dtype=np.int16), FRAME)
    mixed = prompt.mix(np.full(FRAME, 10000, dtype=np.int16))
    assert np.all(mixed == 32767) and not prompt.done
    tail = prompt.mix(np.full(FRAME, -100, dtype=np.int16))
    assert np.all(tail[:40] == 29900) and np.all(tail[40:] == -100) and prompt.done
