"""sora.media.AVWriter: an mp4 written piece by piece is the one write_av writes at once."""

from __future__ import annotations

import io

import numpy as np
import pytest

from sora.media import AVWriter, read_av, write_av

SR = 16000


def frames_and_tone(n=30, h=32, w=48, fps=24):
    t = np.arange(n)[:, None, None]
    x = np.arange(w)[None, None, :] + np.arange(h)[None, :, None]
    frames = np.stack([(x * 3 + t * 5) % 256, (x + t * 2) % 256, np.broadcast_to(t * 9 % 256, (n, h, w))], -1)
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(round(n / fps * SR)) / SR)
    return frames.astype(np.uint8), np.stack([tone, -tone]).astype(np.float32)


@pytest.mark.parametrize("fps", [24, 30000 / 1001])
def test_pieces_give_the_bytes_of_one_write(fps):
    frames, audio = frames_and_tone(fps=fps)
    whole = io.BytesIO()
    write_av(whole, frames, audio, fps, SR)
    pieces = io.BytesIO()
    with AVWriter(pieces, fps, SR) as writer:
        for a, b in [(0, 7), (7, 8), (8, 30)]:  # audio cut where its frames are
            writer.write(frames[a:b], audio[:, round(a / fps * SR): round(b / fps * SR)])
    assert pieces.getvalue() == whole.getvalue()
    assert len(read_av(pieces.getvalue()).frames) == 30


def test_audio_is_made_as_long_as_the_video(tmp_path):
    frames, audio = frames_and_tone()
    with AVWriter(tmp_path / "short.mp4", 24, SR) as writer:  # audio ends early: padded at close
        writer.write(frames[:10], audio[:, :100])
        writer.write(frames[10:], audio[:, 100:5000])
    clip = read_av(tmp_path / "short.mp4", sample_rate=SR, channels=2)
    assert clip.audio.shape == (2, 20000) and not np.abs(clip.audio[:, 6000:]).any()
    with pytest.raises(ValueError, match="samples"):  # more than one frame's worth too long
        with AVWriter(io.BytesIO(), 24, SR) as writer:
            writer.write(frames, np.concatenate([audio, audio], 1))
    with pytest.raises(ValueError, match="audio must be given with every write"):
        with AVWriter(io.BytesIO(), 24, SR) as writer:
            writer.write(frames[:5], audio[:, :100])
            writer.write(frames[5:])


def test_an_error_abandons_the_file():
    frames, _ = frames_and_tone()
    out = io.BytesIO()
    with pytest.raises(RuntimeError):
        with AVWriter(out, 24, SR) as writer:
            writer.write(frames)
            raise RuntimeError("stop")
    assert out.getvalue() == b""
    with pytest.raises(ValueError, match="no frame"):
        AVWriter(io.BytesIO(), 24, SR).close()
