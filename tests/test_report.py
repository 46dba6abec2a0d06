"""Report rendering: self-contained HTML with embedded images, Markdown, and a real-browser check."""

from __future__ import annotations

import shutil

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from dlmedit.report.render import Report


def _report(tmp_path):
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [1, 0, 1])
    png = tmp_path / "curve.png"
    fig.savefig(png)
    plt.close(fig)
    report = Report("Test report", "generated in a test")
    report.section("Numbers").text("Exact match drops from 0.9 to 0.4.").table(
        [{"model": "arm", "EM": 0.9}, {"model": "mdm", "EM": float("nan")}], caption="EM by model"
    ).figure(png, "a curve")
    return report


def test_html_is_self_contained_and_markdown_links_images(tmp_path):
    html_path, md_path = _report(tmp_path).write(tmp_path / "out")
    html = html_path.read_text()
    assert "data:image/png;base64," in html and "curve.png" in html
    assert "<td>–</td>" in html and "0.900" in html
    md = md_path.read_text()
    assert "| arm | 0.900 |" in md and "![a curve](" in md


def test_a_table_shows_every_rows_columns_even_when_the_first_row_is_a_note():
    report = Report("t", "s")
    report.section("Edits").table([{"model": "mdm", "run": "partial: not run (one state)"},
                                   {"model": "mdm", "run": "rome/final", "GenEM": 0.5}])
    md = report.to_markdown()
    assert "| model | run | GenEM |" in md and "| mdm | rome/final | 0.500 |" in md
    assert "| mdm | partial: not run (one state) | – |" in md
    assert "<th>GenEM</th>" in report.to_html()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium not installed (apt-get install chromium)")
def test_report_opens_in_headless_chromium_with_all_images(tmp_path):
    from dlmedit.report.browser import check_report

    html_path, _ = _report(tmp_path).write(tmp_path / "out")
    loaded, total = check_report(html_path, screenshot=tmp_path / "shot.png")
    assert (loaded, total) == (1, 1)
    assert (tmp_path / "shot.png").stat().st_size > 1000
