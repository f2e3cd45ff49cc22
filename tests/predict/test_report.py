"""nemo_quagmire.predict.report: the page is self-contained, shows what the Analysis holds, and its plots are
visible when headless Chromium renders it (checked on a screenshot, against a control page without them)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from nemo_quagmire.predict.analysis import analyze, summarize
from nemo_quagmire.predict.report import CANDIDATE_COLOR, LABELLED_COLOR, render_html
from nemo_quagmire.predict.table import Table, read_table

EXAMPLE = Path(__file__).resolve().parents[2] / "scripts" / "examples" / "predict" / "checkpoints.csv"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def example_page() -> tuple[str, object]:
    analysis = analyze(read_table(EXAMPLE, "post_rl_pass@1"), resamples=100, seed=0)
    return render_html(analysis, summarize(analysis)), analysis


def test_page_is_self_contained(example_page):
    page, _ = example_page
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert (
        "<script" not in page and "http://" not in page and "https://" not in page and "@import" not in page
    )
    images = [base64.b64decode(s.split(",", 1)[1]) for s in sources]
    assert len(images) == 3 and all(img.startswith(PNG_SIGNATURE) for img in images)  # k-curve, LOO, scatter


def test_page_shows_the_analysis(example_page):
    page, analysis = example_page
    for sentence in summarize(analysis):
        assert sentence.replace("'", "&#x27;") in page
    best = analysis.best
    assert f"<td>{best.r2_loo:.3f}</td>" in page
    table = analysis.table
    for i, rank in enumerate(analysis.candidate_ranks()):
        if rank is not None:
            assert (
                f'<td class="name">{table.ids[i]}</td><td>{rank}</td><td>{best.predicted[i]:.4f}</td>' in page
            )
    candidates = int((~table.labelled).sum())
    # candidates, feature sets, labelled rows (each table with its header row)
    assert page.count("<tr") == 1 + candidates + 1 + len(analysis.fits) + 1 + (len(table.ids) - candidates)
    assert 'class="warning"' not in page


def test_warnings_and_missing_pass_at_k_render():
    nan = float("nan")
    table = Table(("a", "b", "c"), {"heldout_loss": (0.5, 0.6, 0.55)}, "post", (0.4, 0.3, nan), "tiny")
    analysis = analyze(table, resamples=20)
    page = render_html(analysis, summarize(analysis))
    assert 'class="warning"' in page and "only 2 rows have a target" in page
    assert page.count("<img") == 2  # no k-curve without pass@k columns


def _chromium() -> str | None:
    return next((p for name in ("chromium", "chromium-browser") if (p := shutil.which(name))), None)


def _screenshot(html_path: Path, png: Path, profile: Path) -> np.ndarray:
    chromium = _chromium()
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1200,2000", html_path.as_uri(),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert png.is_file(), f"chromium wrote no screenshot (exit {result.returncode}):\n{result.stderr[-2000:]}"
    return mpimg.imread(png)[..., :3]  # [H, W, 3] floats in [0, 1]


def _pixels_near(rgb: np.ndarray, hex_color: str, tolerance: float = 0.1) -> int:
    target = np.array([int(hex_color[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(rgb - target).max(axis=-1) < tolerance).sum())


@pytest.mark.skipif(
    _chromium() is None,
    reason="headless Chromium is not installed (Debian: apt-get install -y chromium); CI installs it",
)
def test_plots_are_visible_in_headless_chromium(example_page, tmp_path):
    page, _ = example_page
    (tmp_path / "report.html").write_text(page, encoding="utf-8")
    # control: the same page with every image broken, so the counts below must come from the plots
    control = re.sub(r"data:image/png;base64,[^\"]*", "data:image/png;base64,AAAA", page)
    (tmp_path / "control.html").write_text(control, encoding="utf-8")
    shot = _screenshot(tmp_path / "report.html", tmp_path / "report.png", tmp_path / "profile")
    blank = _screenshot(tmp_path / "control.html", tmp_path / "control.png", tmp_path / "profile")
    assert shot.shape[:2] == (2000, 1200)

    # Blue marks labelled checkpoints and the R^2 curves (about 3,400 pixels), orange the candidates (about
    # 210); the text-and-tables control has none of either.
    blue, orange = _pixels_near(shot, LABELLED_COLOR), _pixels_near(shot, CANDIDATE_COLOR)
    assert blue > 1500 and orange > 100, (blue, orange)
    assert _pixels_near(blank, LABELLED_COLOR) < 50 and _pixels_near(blank, CANDIDATE_COLOR) < 20
    # Text and tables are grey; the plots are in colour and shaded, so the screenshot has many coloured
    # pixels and many distinct colours in its upper part, the control few (about 11,700 vs 100 and 310 vs 45).
    coloured = [int(((img.max(axis=-1) - img.min(axis=-1)) > 0.25).sum()) for img in (shot, blank)]
    assert coloured[0] > 5000 > 500 > coloured[1], coloured
    variety = [len(np.unique((img[200:1300] * 15).round().reshape(-1, 3), axis=0)) for img in (shot, blank)]
    assert variety[0] > 200 > 100 > variety[1], variety
