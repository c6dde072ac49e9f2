"""aios_fast._atomic.save_figure: PNGs people keep are replaced atomically, and figures are closed."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from aios_fast._atomic import save_figure  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _figure():
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1, 2], [2, 0, 1])
    return fig


def test_save_figure_writes_a_png_and_closes_the_figure(tmp_path):
    fig = _figure()
    out = save_figure(fig, tmp_path / "sub" / "curve.png", dpi=50)
    assert out == tmp_path / "sub" / "curve.png"
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert fig.number not in plt.get_fignums()


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "chart.png"
    target.write_bytes(b"old chart")
    fig = _figure()
    fig.axes[0].set_title(r"$\notacommand{x}$")  # mathtext fails only when the figure is drawn
    with pytest.raises(ValueError):
        save_figure(fig, target, dpi=50)
    assert target.read_bytes() == b"old chart"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chart.png"]
    assert fig.number not in plt.get_fignums()
