"""The report's figures: what each draws (figure captured before it is written)."""

from pathlib import Path

import pytest

from diffquant.report import plots


@pytest.fixture
def captured(monkeypatch):
    figs = []

    def save(fig, path: Path) -> Path:
        figs.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", save)
    return figs


def curve(offset: float) -> list[dict]:
    return [{"t": t, "sqnr_db": offset + t / 100} for t in (981, 501, 21)]


def test_step_sqnr_draws_one_curve_per_label_with_a_legend(captured, tmp_path):
    plots.plot_step_sqnr({"w8a8": curve(30.0), "w4a8": curve(20.0)}, tmp_path / "x.png", "t")
    ax = captured[0].axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["w8a8", "w4a8"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["w8a8", "w4a8"]
    assert list(ax.get_lines()[1].get_ydata()) == pytest.approx([29.81, 25.01, 20.21])
    assert ax.get_xlim()[0] > ax.get_xlim()[1]  # noisiest step on the left


def test_step_sqnr_single_curve_has_no_legend_and_caps_exact_steps(captured, tmp_path):
    plots.plot_step_sqnr([{"t": 1, "sqnr_db": float("inf")}, {"t": 0, "sqnr_db": 40.0}], tmp_path / "x.png", "t")
    ax = captured[0].axes[0]
    assert len(ax.get_lines()) == 1 and ax.get_legend() is None
    assert list(ax.get_lines()[0].get_ydata()) == [120.0, 40.0]
