"""Tests for memscan.report: verdicts and tables, figures, the self-contained HTML page and that it renders."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from memscan.report import (
    PairImage,
    ReportContent,
    ReportSection,
    comparison_table,
    display_slices,
    figure_to_png,
    plot_distributions,
    plot_pair_gallery,
    ranked_pairs,
    render_html,
    set_headline,
    verdict,
    write_report,
)
from memscan.report.tables import format_fraction, interval

CHROMIUM = Path("/usr/bin/chromium")


def _block(n_copies: int, n_syn: int = 100, ci: tuple[float, float] | None = None, null_rate: float = 0.05) -> dict:
    block = {
        "n_copies_synthetic": n_copies,
        "n_synthetic": n_syn,
        "frac_copies_synthetic": n_copies / n_syn,
        "n_memorized_train": n_copies,
        "n_train": 200,
        "frac_memorized_train": n_copies / 200,
        "null_rate": null_rate,
        "percentile": 95.0,
        "n_memorized_subjects": min(n_copies, 3),
        "n_train_subjects": 10,
    }
    if ci is not None:
        block["frac_copies_synthetic_ci"] = list(ci)
    return block


def test_verdict_levels_follow_the_chance_rate() -> None:
    assert verdict(_block(0))[0] == "clean"
    level, text = verdict(_block(40, ci=(0.3, 0.5)))
    assert level == "copies" and "40 of 100" in text and "3 of 10 training patients" in text
    # 6% flagged but its interval reaches below the 5% null rate: within chance → review, not "copies"
    assert verdict(_block(6, ci=(0.02, 0.11)))[0] == "review"
    # without an interval the point estimate is compared with the null rate
    assert verdict(_block(6, null_rate=0.01))[0] == "copies"
    # the copy-rate null (new-patient images flagged as copies) takes precedence over the memorization null rate
    block = _block(6, null_rate=0.01)
    block["null_rate_copies"] = 0.2
    assert verdict(block)[0] == "review"
    # without a null rate the chance rate is (100 - percentile)%
    block = _block(3)
    del block["null_rate"]
    assert verdict(block)[0] == "review"


def test_interval_and_fraction_formatting() -> None:
    assert interval({"x_ci95": [0.1, 0.2]}, "x") == (0.1, 0.2)
    assert interval({"x_ci": [0.1, 0.2]}, "x") == (0.1, 0.2)
    assert interval({"x_ci_low": 0.1, "x_ci_high": 0.3}, "x") == (0.1, 0.3)
    assert interval({"x_ci": [float("nan"), 0.2]}, "x") is None
    assert format_fraction(0.125, (0.05, 0.2)) == "12.5% (95% CI 5.0–20.0%)"
    assert format_fraction(None) == "n/a"


def test_headline_and_comparison_tables() -> None:
    blocks = {"ldm": _block(40, ci=(0.3, 0.5)), "gan": _block(0)}
    blocks["ldm"]["data_copying_ct"] = -4.2
    blocks["ldm"]["authenticity"] = 0.61
    blocks["ldm"]["controls"] = {"n": 8, "n_caught": 7}
    labels = dict(set_headline(blocks["ldm"]))
    assert labels["positive controls caught"] == "7 of 8"
    assert labels["data-copying C_T (Meehan; ≪0 = copying)"] == "-4.20"
    table = comparison_table(blocks)
    assert list(table["synthetic set"]) == ["ldm", "gan"]
    assert list(table["verdict"]) == ["copies", "clean"]
    assert table.loc[1, "C_T"] == "n/a"


def test_ranked_pairs_copies_and_borderline() -> None:
    table = pd.DataFrame({
        "synthetic_set": "s", "synthetic_index": range(6), "path": [f"s{i}.png" for i in range(6)],
        "best_train_index": [0, 1, 2, 3, 4, 5], "train_path": [f"t{i}.png" for i in range(6)],
        "best_train_correlation": [0.99, 0.5, 0.91, 0.89, 0.9, 0.95], "copy": [True, False, True, False, False, True],
    })
    copies = ranked_pairs(table, 0.9, kind="copies")
    assert list(copies["synthetic_index"]) == [0, 5, 2]
    border = ranked_pairs(table, 0.9, kind="borderline", n=2)
    assert list(border["synthetic_index"]) == [4, 3]  # at or just below τ, closest first
    assert np.allclose(border["margin"], [0.0, -0.01])
    with pytest.raises(ValueError):
        ranked_pairs(table, 0.9, kind="other")


def test_display_slices_2d_and_3d() -> None:
    assert [s.shape for s in display_slices(np.zeros((1, 20, 30)))] == [(20, 30)]
    assert [s.shape for s in display_slices(np.zeros((20, 30)))] == [(20, 30)]
    vol = np.zeros((1, 32, 40, 12))
    vol[0, :, :, 5] = 1.0
    slices = display_slices(vol, n_slices=6)
    assert len(slices) == 6  # evenly spaced along the shortest axis (12), rotated to display
    assert all(s.shape == (40, 32) for s in slices)
    # positions are evenly spaced and exclude the outermost slices
    vol = np.arange(12, dtype=float)[None, None, None, :] * np.ones((1, 32, 40, 12))
    values = [float(s.mean()) for s in display_slices(vol, 6)]
    assert values == sorted(values) and values[0] > 0 and values[-1] < 11
    assert len(display_slices(np.zeros((1, 4, 8, 8)), 6, spatial_dims=3)) == 4  # fewer slices than asked
    with pytest.raises(ValueError):
        display_slices(np.zeros((2, 2, 2, 2, 2)))


def _png_is_image(png: bytes, tmp_path: Path) -> Image.Image:
    path = tmp_path / "f.png"
    path.write_bytes(png)
    return Image.open(path).convert("RGB")


def test_figures_render(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    fig = plot_distributions(rng.normal(0.8, 0.05, 50), {"a": rng.normal(0.9, 0.05, 50), "b": rng.normal(0.7, 0.05, 50)},
                             0.88)
    assert len(fig.axes) == 2  # one panel per synthetic set
    img = _png_is_image(figure_to_png(fig), tmp_path)
    assert np.asarray(img).std() > 10
    vol = rng.random((1, 12, 16, 16))
    fig = plot_pair_gallery([PairImage(vol, vol, 0.99, "t.nii.gz", "s.nii.gz")] * 2, title="copies", spatial_dims=3)
    assert len(fig.axes) == 2 * 12  # six slices of each volume per row
    png = figure_to_png(fig)
    assert b"matplotlib.org" not in png  # no URL even in PNG metadata
    fig = plot_pair_gallery([], title="borderline")
    assert len(figure_to_png(fig)) > 0
    img = rng.random((1, 16, 16))
    plain, blended = PairImage(img, img, 0.9, "t1.png", "s1.png"), PairImage(img, img, 0.8, "t2.png", "s2.png",
                                                                             second_image=img, second_label="t3.png")
    fig = plot_pair_gallery([plain, blended], pairs_per_row=2)
    assert len(fig.axes) == 2 * 3  # a third panel per pair once one pair is a blend
    assert [ax.get_title(loc="left") for ax in fig.axes if ax.axison] == [
        "#1 train: t1.png", "s1.png\nr=0.9000", "#2 train: t2.png", "s2.png\nr=0.8000", "blended with: t3.png"]
    assert len(plot_pair_gallery([plain] * 2, pairs_per_row=2).axes) == 2 * 2
    assert len(plot_pair_gallery([plain]).axes) == 2  # one pair: no empty columns for the other three of a row


def _content(tmp_path: Path) -> ReportContent:
    rng = np.random.default_rng(1)
    fig = plot_distributions(rng.normal(0.8, 0.05, 50), {"ldm": rng.normal(0.9, 0.05, 50)}, 0.88)
    img = rng.random((1, 32, 32))
    gallery = plot_pair_gallery([PairImage(img, img, 0.97, "train/PAT-0001_a.png", "syn/s1.png")], title="copies")
    block = _block(12, ci=(0.06, 0.19))
    level, text = verdict(block)
    section = ReportSection(name="ldm", verdict_level=level, verdict=text, headline=set_headline(block),
                            figures=[("strongest copies", figure_to_png(gallery))],
                            tables=[("copies", pd.DataFrame({"path": ["syn/s1.png"], "train_path": ["SECRET123"],
                                                             "best_train_correlation": [0.97]}))])
    return ReportContent(
        title="memscan audit", intro="2D audit <b>", banners=[("review", "1 of 8 controls missed")],
        overview=[("τ", "0.88")], comparison=comparison_table({"ldm": block}),
        figures=[("distributions", figure_to_png(fig))], sections=[section],
        skipped=pd.DataFrame({"set": ["train"], "path": ["bad.png"], "reason": ["empty file"]}),
        warnings=["subject SECRET123 in training and validation"], method=["Dar et al."],
        provenance={"memscan": "0.1.0"},
    )


def test_html_is_self_contained_escaped_and_redacted(tmp_path: Path) -> None:
    path = write_report(_content(tmp_path), tmp_path / "report.html", redact=["SECRET123"])
    text = path.read_text(encoding="utf-8")
    assert "http" not in re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text).lower()
    assert not re.search(r"""\b(src|href|action|srcset)\s*=\s*(?!"data:image/png;base64,)""", text)  # every src is a data URI, no href at all
    assert "//" not in re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert "<script" not in text.lower() and "@import" not in text and "url(" not in text
    assert "SECRET123" not in text and "[redacted]" in text
    assert "2D audit &lt;b&gt;" in text  # user text is escaped
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(uris) == 2
    assert base64.b64decode(uris[0])[:8] == b"\x89PNG\r\n\x1a\n"
    for needle in ("Skipped files (1)", "bad.png", "1 of 8 controls missed", "Verdict", "Provenance"):
        assert needle in text
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temporary file


def test_html_without_sections_or_skips() -> None:
    text = render_html(ReportContent(title="t"))
    assert "No file was skipped." in text and "No warnings." in text


def screenshot(html_path: Path, tmp_path: Path) -> Path:
    """Screenshot a local HTML file with headless Chromium, offline; returns the PNG path."""
    out = tmp_path / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1800",
           f"--screenshot={out}", html_path.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return out


@pytest.mark.skipif(not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None,
                    reason="headless Chromium not installed (Debian packages: chromium chromium-driver)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    path = write_report(_content(tmp_path), tmp_path / "report.html")
    shot = screenshot(path, tmp_path)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    assert pixels.std() > 20  # not a blank page
    grey = pixels.mean(axis=2)
    assert (grey < 100).mean() > 0.002  # dark text / image pixels are present
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 50  # figures and verdict colours, not one colour
