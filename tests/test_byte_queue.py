"""Queues bounded by bytes: large video frames never pile up between the decoder, the network and the encoder
(issue 13). Assertions are on counts and bytes, never on time."""

from __future__ import annotations

import queue
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from utils.byte_queue import ByteBudgetQueue


def _frame(height: int, width: int) -> np.ndarray:
    return np.zeros((height, width, 3), np.uint8)


def test_holds_what_its_byte_budget_allows_and_lets_one_oversized_item_through_alone():
    q = ByteBudgetQueue(1000)
    q.put(_frame(10, 10))  # 300 B
    q.put(_frame(10, 20))  # 600 B: 900 held
    with pytest.raises(queue.Full):
        q.put(_frame(10, 10), timeout=0)
    q.put("marker", timeout=0)  # markers hold no bytes
    assert (len(q), q.bytes, q.peak_bytes) == (3, 900, 900)
    assert q.get().shape == (10, 10, 3) and q.bytes == 600
    q.get(), q.get()
    with pytest.raises(queue.Empty):
        q.get(timeout=0)
    q.put(_frame(100, 100), timeout=0)  # 30 000 B, over the budget: an empty queue takes it
    with pytest.raises(queue.Full):
        q.put(_frame(1, 1), timeout=0)
    assert q.peak_bytes == 30_000


def test_item_count_bounds_small_items():
    q = ByteBudgetQueue(10**9, max_items=2)
    q.put(_frame(1, 1)), q.put(_frame(1, 1))
    with pytest.raises(queue.Full):
        q.put(_frame(1, 1), timeout=0)


def test_a_blocked_put_goes_on_once_a_get_makes_room():
    q = ByteBudgetQueue(300)
    q.put(_frame(10, 10))
    putter = threading.Thread(target=q.put, args=(_frame(10, 10),))
    putter.start()
    assert q.get().nbytes == 300
    putter.join(timeout=60)  # only a bound for a broken queue
    assert not putter.is_alive() and (len(q), q.peak_bytes) == (1, 300)


def test_video_queues_hold_at_most_their_byte_budget_of_frames(monkeypatch, tmp_path):
    """The network is held on its first batch until the decoder is refused: the decoded frames waiting stop at
    the byte budget (two frames), not at the frame count (2 × batch_frames)."""
    import imageio_ffmpeg

    from engine import video
    from engine.video import VideoLimits, VideoSettings, upscale_video

    clip = tmp_path / "testsrc.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc=size=64x48:rate=24", "-frames:v", "24", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    str(clip)], check=True)
    frame_bytes = 64 * 48 * 3
    queues: list[ByteBudgetQueue] = []
    refused = threading.Event()

    class Recording(ByteBudgetQueue):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            queues.append(self)

        def put(self, item, timeout=None):
            try:
                super().put(item, timeout)
            except queue.Full:
                refused.set()
                raise

    monkeypatch.setattr(video, "ByteBudgetQueue", Recording)
    monkeypatch.setattr(video, "FRAME_QUEUE_BYTES", int(2.5 * frame_bytes))
    batches: list[int] = []

    def enhancer(frames: list[np.ndarray]) -> list[np.ndarray]:
        if not batches:
            assert refused.wait(timeout=120), "the decoder was never held back"  # only a bound for a broken pipe
        batches.append(len(frames))
        return [np.repeat(np.repeat(f, 2, axis=0), 2, axis=1) for f in frames]

    limits = VideoLimits(max_bytes=10**9, max_seconds=600, max_frames=10_000, max_pixels=10**8)
    result = upscale_video(clip, tmp_path / "out.mp4", enhancer, VideoSettings(batch_frames=4, preset="ultrafast"),
                           limits=limits)
    decoded, enhanced = queues
    assert sum(batches) == 24 and result.frames == 24 and Path(result.output).is_file()
    assert decoded.peak_bytes == 2 * frame_bytes  # filled to its budget, then the decoder waited
    assert enhanced.peak_bytes == 4 * frame_bytes  # each output frame is over the budget: one at a time
