"""Video and GIF writing with imageio (MP4: H.264 through imageio-ffmpeg's ffmpeg; GIF: Pillow).

:class:`VideoWriter` takes frames one at a time (an MP4 is streamed to ffmpeg, so an episode's frames
need not all stay in memory); frame sizes are padded to a multiple of 16 for the encoder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

FORMATS = ("off", "gif", "mp4")


def pad16(frame: np.ndarray) -> np.ndarray:
    """Pad (H, W, 3) with black to multiples of 16 (H.264 macroblocks; avoids imageio's resize)."""
    h, w = frame.shape[:2]
    ph, pw = (-h) % 16, (-w) % 16
    if not ph and not pw:
        return frame
    return np.pad(frame, ((0, ph), (0, pw), (0, 0)))


class VideoWriter:
    """Frames -> ``path`` (.mp4 or .gif by suffix) at ``fps``. GIFs are collected and written by :meth:`close`
    (``gif_scale`` < 1 downsizes them, ``gif_stride`` keeps every n-th frame)."""

    def __init__(self, path: str | Path, fps: float, *, gif_scale: float = 1.0, gif_stride: int = 1,
                 quality: float = 7.0) -> None:
        self.path = Path(path)
        self.fps = float(fps)
        self.kind = self.path.suffix.lower().lstrip(".")
        if self.kind not in ("mp4", "gif"):
            raise ValueError(f"{self.path}: the video must be .mp4 or .gif")
        if self.fps <= 0:
            raise ValueError("fps: must be positive")
        self.gif_scale, self.gif_stride = float(gif_scale), max(int(gif_stride), 1)
        self.frames = 0
        self._gif: list[np.ndarray] = []
        self._seen = 0
        self._writer: Any = None
        self._quality = quality
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, frame: np.ndarray) -> None:
        frame = np.ascontiguousarray(frame[..., :3], dtype=np.uint8)
        if self.kind == "mp4":
            if self._writer is None:
                import imageio.v2 as iio

                self._writer = iio.get_writer(str(self.path), fps=self.fps, codec="libx264", quality=self._quality,
                                              pixelformat="yuv420p", macro_block_size=16, ffmpeg_log_level="error")
            self._writer.append_data(pad16(frame))
            self.frames += 1
            return
        k = self._seen
        self._seen += 1
        if k % self.gif_stride:
            return
        if self.gif_scale != 1.0:
            import cv2

            h, w = frame.shape[:2]
            frame = cv2.resize(frame, (max(int(w * self.gif_scale), 1), max(int(h * self.gif_scale), 1)),
                               interpolation=cv2.INTER_AREA)
        self._gif.append(frame)
        self.frames += 1

    def close(self) -> Path | None:
        """Finish the file; the path, or None when no frame was written."""
        if self.kind == "mp4":
            if self._writer is None:
                return None
            self._writer.close()
            self._writer = None
            return self.path
        if not self._gif:
            return None
        import imageio.v3 as iio3

        duration_ms = 1000.0 * self.gif_stride / self.fps
        iio3.imwrite(self.path, np.stack(self._gif), extension=".gif", duration=duration_ms, loop=0)
        self._gif = []
        return self.path

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
