"""Issue 28: the token overlay, the chunk panel, the video writer and the progress line (synthetic inputs)."""
from __future__ import annotations

import io

import numpy as np
import pytest

from effvla_ros.viz.overlay import (
    DIM,
    KEPT_COLOR,
    RECOMPUTED_COLOR,
    TINT_ALPHA,
    Chunk,
    TokenView,
    cell_bounds,
    chunk_panel,
    token_overlay,
)
from effvla_ros.viz.progress import ProgressLine
from effvla_ros.viz.video import VideoWriter


def _image(seed: int = 0, h: int = 64, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(60, 200, size=(h, w, 3), dtype=np.uint8)


def _interior(img: np.ndarray, grid: tuple[int, int], i: int, margin: int = 4) -> np.ndarray:
    y0, y1, x0, x1 = cell_bounds(grid, img.shape[:2], i)
    return img[y0 + margin:y1 - margin, x0 + margin:x1 - margin].astype(np.float64)


def test_overlay_outlines_kept_dims_pruned_tints_recomputed() -> None:
    src = _image()
    grid, size = (4, 4), 320
    kept = [0, 5, 6, 15]
    reused = [True, False, True, False]  # 5 and 15 recomputed this frame
    out = token_overlay(src, TokenView(grid, kept, reused), size)
    plain = token_overlay(src, None, size)
    assert out.shape == (size, size, 3) and plain.shape == (size, size, 3)
    for i in range(16):
        got, ref = _interior(out, grid, i), _interior(plain, grid, i)
        if i not in kept:  # pruned: dimmed to DIM
            assert np.allclose(got, ref * DIM, atol=1.0), i
        elif reused[kept.index(i)]:  # kept and reused: the pixels unchanged
            assert np.array_equal(got, ref), i
        else:  # recomputed: blended toward the tint colour
            want = (1 - TINT_ALPHA) * ref + TINT_ALPHA * np.asarray(RECOMPUTED_COLOR, dtype=np.float64)
            assert np.allclose(got, want, atol=1.0), i
    for i in kept:  # the outline: the cell's border pixels are the kept colour
        y0, y1, x0, x1 = cell_bounds(grid, (size, size), i)
        assert tuple(out[y0, (x0 + x1) // 2]) == KEPT_COLOR
        assert tuple(out[(y0 + y1) // 2, x1 - 1]) == KEPT_COLOR
    for i in (3, 8, 12):  # a pruned cell's own border (no kept neighbour) is not outlined
        y0, y1, x0, x1 = cell_bounds(grid, (size, size), i)
        assert tuple(out[y1 - 1, (x0 + x1) // 2]) != KEPT_COLOR
    # mean brightness: pruned cells are darker than kept ones
    pruned_mean = np.mean([_interior(out, grid, i).mean() for i in range(16) if i not in kept])
    kept_mean = np.mean([_interior(out, grid, i).mean() for i in kept])
    assert pruned_mean < 0.5 * kept_mean


def test_overlay_unknown_reuse_and_out_of_range_indices() -> None:
    src = _image(1, 48, 64)
    out = token_overlay(src, TokenView((2, 2), [0, 7], None), 96)  # 7 is not in a 2x2 grid: ignored
    plain = token_overlay(src, None, 96)
    assert np.array_equal(_interior(out, (2, 2), 0), _interior(plain, (2, 2), 0))  # kept, no tint without flags
    assert np.allclose(_interior(out, (2, 2), 3), _interior(plain, (2, 2), 3) * DIM, atol=1.0)


def test_chunk_panel_draws_executed_and_chunks() -> None:
    t = np.linspace(0.0, 3.0, 61)
    q = np.stack([np.sin(t + j) for j in range(6)], axis=1)
    chunks = [Chunk(0.5 * k + 0.1, 0.5 * k, 0.1, np.full((10, 6), 0.5 * k - 1.0)) for k in range(6)]
    names = [f"j{j}" for j in range(6)]
    empty = chunk_panel(600, 200, 3.0, t[:0], q[:0], [], names)
    img = chunk_panel(600, 200, 3.0, t, q, chunks, names)
    assert img.shape == (200, 600, 3)
    white = np.all(img >= 230, axis=2).sum()
    blue = ((img[..., 2] > 200) & (img[..., 0] < 140)).sum()  # the newest chunk's colour
    assert white > np.all(empty >= 230, axis=2).sum() + 100  # executed traces (white) appear
    assert blue > 50
    # chunks received after t_now are not drawn
    early = chunk_panel(600, 200, 0.05, t[:2], q[:2], chunks, names)
    assert ((early[..., 2] > 200) & (early[..., 0] < 140)).sum() == 0


@pytest.mark.parametrize("kind", ["mp4", "gif"])
def test_video_writer_readable(tmp_path, kind: str) -> None:  # type: ignore[no-untyped-def]
    import imageio.v3 as iio

    frames = [np.full((100, 150, 3), 20 * k, dtype=np.uint8) for k in range(6)]
    for k, f in enumerate(frames):
        f[:, : 10 + 20 * k] = 255  # a moving bar: frames differ
    w = VideoWriter(tmp_path / f"v.{kind}", fps=5, gif_scale=1.0)
    for f in frames:
        w.append(f)
    path = w.close()
    assert path is not None and path.stat().st_size > 0
    back = iio.imread(path)
    assert back.shape[0] == 6
    if kind == "mp4":  # padded to multiples of 16 for the encoder
        assert back.shape[1:] == (112, 160, 3)
    else:
        assert back.shape[1:3] == (100, 150)
    # the content survives (lossy): the bar's right edge moves
    edges = [int(np.argmax(fr[50, :, 0] < 128)) for fr in back]
    assert edges == sorted(edges) and edges[-1] - edges[0] >= 80


def test_video_writer_gif_scale_and_stride(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import imageio.v3 as iio

    w = VideoWriter(tmp_path / "s.gif", fps=10, gif_scale=0.5, gif_stride=2)
    for k in range(7):
        w.append(np.full((64, 96, 3), 30 * k, dtype=np.uint8))
    w.close()
    back = iio.imread(tmp_path / "s.gif")
    assert back.shape[:3] == (4, 32, 48)
    assert VideoWriter(tmp_path / "none.mp4", fps=10).close() is None  # no frame: no file
    with pytest.raises(ValueError):
        VideoWriter(tmp_path / "x.avi", fps=10)


def test_progress_log_mode_prints_plain_lines() -> None:
    buf = io.StringIO()
    bar = ProgressLine("  episode 0", 25.0, unit="s sim", stream=buf, log_every=5.0)
    assert not bar.tty  # a StringIO is no terminal
    t = 0.0
    while t <= 12.0:
        state = "reaching" if t < 7.0 else "lifted"
        bar.update(t, f"{int(t)} chunks", state)
        t += 0.5
    bar.close("  episode 0: done")
    text = buf.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # at 0, 5, the state change at 7, then 12; not one line per update (25 updates)
    assert [ln.split("]")[1].split("/")[0].strip() for ln in lines[:-1]] == ["0.0", "5.0", "7.0", "12.0"]
    assert "lifted" in lines[2] and "reaching" in lines[1]
    assert lines[-1] == "  episode 0: done"


def test_progress_tty_mode_rewrites_one_line() -> None:
    buf = io.StringIO()
    bar = ProgressLine("ep", 10.0, stream=buf, tty=True, min_interval=0.0)
    for t in (1.0, 2.0, 3.0):
        bar.update(t, "x", "reaching")
    bar.close("ep: done")
    text = buf.getvalue()
    assert text.count("\n") == 1 and text.endswith("ep: done\n")
    assert text.count("\r") >= 3 and "[#######" in text  # 3/10 of 24 chars
