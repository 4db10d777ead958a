"""A self-contained HTML report a privacy reviewer can open offline.

The report holds patient images, so it must open on an air-gapped workstation and leak nothing: every image is an
inline ``data:image/png;base64`` URI, the style sheet is inline, and the page references no URL of any kind (no
scripts, fonts, links or trackers). Text comes only from what the audit computed and from the file names the user
supplied; subject ids that do not appear in a file name (e.g. read from a DICOM ``PatientID``) are passed as
``redact`` terms and replaced before anything is written.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from memscan.io import write_text_atomic

__all__ = ["ReportSection", "ReportContent", "render_html", "write_report", "png_data_uri"]

VERDICT_LEVELS = ("copies", "review", "clean", "info")


@dataclass
class ReportSection:
    """One synthetic set's part of the report.

    Args:
        name: synthetic set name.
        verdict_level: ``"copies"`` (red), ``"review"`` (amber) or ``"clean"`` (green).
        verdict: the plain-language verdict.
        headline: (label, value) pairs shown as cards.
        figures: (caption, PNG bytes) pairs.
        tables: (caption, DataFrame) pairs.
        notes: extra paragraphs.
    """

    name: str
    verdict_level: str
    verdict: str
    headline: list[tuple[str, str]] = field(default_factory=list)
    figures: list[tuple[str, bytes]] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class ReportContent:
    """Everything the report shows.

    Args:
        title: page title.
        intro: one paragraph under the title (what was audited, how).
        banners: (level, text) alerts shown at the top (e.g. positive controls not caught).
        overview: (label, value) cards for the whole audit (τ, its interval, the null rate, counts).
        comparison: one row per synthetic set, side by side.
        figures: (caption, PNG bytes) figures for the whole audit (the paper's distributions figure).
        sections: one per synthetic set.
        skipped: files that were not audited (columns ``set, path, reason``).
        warnings: data warnings (patient overlap, duplicates, controls).
        method: paragraphs explaining the method and the statistics.
        provenance: versions, checkpoint hash, configuration (shown as a key/value table).
    """

    title: str
    intro: str = ""
    banners: list[tuple[str, str]] = field(default_factory=list)
    overview: list[tuple[str, str]] = field(default_factory=list)
    comparison: pd.DataFrame | None = None
    figures: list[tuple[str, bytes]] = field(default_factory=list)
    sections: list[ReportSection] = field(default_factory=list)
    skipped: pd.DataFrame | None = None
    warnings: list[str] = field(default_factory=list)
    method: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)


_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d232b;
line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:20px;margin:34px 0 10px;border-bottom:2px solid #d9dde3;
padding-bottom:4px}h3{font-size:16px;margin:22px 0 8px}
p.intro{color:#46505c;margin-top:2px}
.banner{border-radius:6px;padding:12px 16px;margin:10px 0;font-weight:600}
.banner.copies{background:#fde2e1;border-left:6px solid #c0392b}
.banner.review{background:#fff3d6;border-left:6px solid #d68910}
.banner.clean{background:#e3f5e9;border-left:6px solid #1e8449}
.banner.info{background:#e6eef8;border-left:6px solid #2e86c1}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:8px 12px;min-width:150px}
.card .k{font-size:12px;color:#5b6673}.card .v{font-size:17px;font-weight:600}
.verdict{border-radius:6px;padding:12px 16px;margin:8px 0 12px;font-size:16px}
.verdict.copies{background:#fde2e1;border-left:6px solid #c0392b}
.verdict.review{background:#fff3d6;border-left:6px solid #d68910}
.verdict.clean{background:#e3f5e9;border-left:6px solid #1e8449}
.verdict.info{background:#e6eef8;border-left:6px solid #2e86c1}
figure{margin:12px 0;background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:10px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{font-size:13px;color:#46505c;margin-top:6px}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:8px 0}
th,td{border:1px solid #dde1e6;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.scroll{max-height:420px;overflow:auto}
ul.warn li{margin:3px 0}
footer{margin-top:40px;color:#6b7580;font-size:12px}
"""


def png_data_uri(png: bytes) -> str:
    """Return ``data:image/png;base64,...`` for PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class _Text:
    """Escapes text for HTML after replacing redacted terms."""

    def __init__(self, redact: Iterable[str]) -> None:
        self.terms = sorted({t for t in redact if t and str(t).strip()}, key=len, reverse=True)

    def __call__(self, value: object) -> str:
        text = "" if value is None else str(value)
        for term in self.terms:
            text = text.replace(term, "[redacted]")
        return html.escape(text, quote=True)


def _cards(items: Sequence[tuple[str, str]], t: _Text) -> str:
    if not items:
        return ""
    cells = "".join(f'<div class="card"><div class="k">{t(k)}</div><div class="v">{t(v)}</div></div>'
                    for k, v in items)
    return f'<div class="cards">{cells}</div>'


def _figure(caption: str, png: bytes, t: _Text) -> str:
    return (f'<figure><img alt="{t(caption)}" src="{png_data_uri(png)}">'
            f"<figcaption>{t(caption)}</figcaption></figure>")


def _table(df: pd.DataFrame | None, t: _Text, *, max_rows: int = 500, empty: str = "none") -> str:
    if df is None or len(df) == 0:
        return f"<p>{t(empty)}</p>"
    shown = df.head(max_rows)
    head = "".join(f"<th>{t(c)}</th>" for c in shown.columns)
    rows = []
    for rec in shown.itertuples(index=False):
        cells = []
        for value in rec:
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if isinstance(value, float):
                value = f"{value:.4f}"
            cells.append(f'<td class="num">{t(value)}</td>' if numeric else f"<td>{t(value)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p>… {len(df) - max_rows} more rows in the CSV files.</p>" if len(df) > max_rows else ""
    body = "".join(rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{more}'


def _level(level: str) -> str:
    return level if level in VERDICT_LEVELS else "info"


def render_html(content: ReportContent, *, redact: Iterable[str] = ()) -> str:
    """Render the report as one self-contained HTML document.

    Args:
        content: what to show.
        redact: strings (e.g. subject ids taken from DICOM headers) replaced by ``[redacted]`` in all text.

    Returns:
        the HTML text. It contains no external reference: images are data URIs and the CSS is inline.
    """
    t = _Text(redact)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{t(content.title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{t(content.title)}</h1>",
    ]
    if content.intro:
        parts.append(f'<p class="intro">{t(content.intro)}</p>')
    for level, text in content.banners:
        parts.append(f'<div class="banner {_level(level)}">{t(text)}</div>')
    if content.sections:
        parts.append("<h2>Verdict</h2>")
        for sec in content.sections:
            parts.append(f'<div class="verdict {_level(sec.verdict_level)}"><b>{t(sec.name)}:</b> '
                         f"{t(sec.verdict)}</div>")
    parts.append("<h2>Headline numbers</h2>")
    parts.append(_cards(content.overview, t))
    if content.comparison is not None:
        parts.append("<h3>Synthetic sets side by side</h3>")
        parts.append(_table(content.comparison, t))
    for caption, png in content.figures:
        parts.append(_figure(caption, png, t))
    for sec in content.sections:
        parts.append(f"<h2>Synthetic set: {t(sec.name)}</h2>")
        parts.append(f'<div class="verdict {_level(sec.verdict_level)}">{t(sec.verdict)}</div>')
        parts.append(_cards(sec.headline, t))
        for note in sec.notes:
            parts.append(f"<p>{t(note)}</p>")
        for caption, png in sec.figures:
            parts.append(_figure(caption, png, t))
        for caption, df in sec.tables:
            parts.append(f"<h3>{t(caption)}</h3>")
            parts.append(_table(df, t))
    parts.append("<h2>Warnings</h2>")
    if content.warnings:
        parts.append('<ul class="warn">' + "".join(f"<li>{t(w)}</li>" for w in content.warnings) + "</ul>")
    else:
        parts.append("<p>No warnings.</p>")
    n_skipped = 0 if content.skipped is None else len(content.skipped)
    parts.append(f"<h2>Skipped files ({n_skipped})</h2>")
    parts.append(_table(content.skipped, t, empty="No file was skipped."))
    if content.method:
        parts.append("<h2>Method</h2>")
        parts.extend(f"<p>{t(p)}</p>" for p in content.method)
    if content.provenance:
        parts.append("<h2>Provenance</h2>")
        prov = pd.DataFrame({"item": list(content.provenance), "value": [str(v) for v in content.provenance.values()]})
        parts.append(_table(prov, t))
    parts.append("<footer>Generated by memscan. This file is self-contained and references no external resource; "
                 "it contains patient images: store and share it as you would the training data.</footer>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


def write_report(content: ReportContent, path: str | os.PathLike[str], *, redact: Iterable[str] = ()) -> Path:
    """Render the report and write it atomically (temporary file + ``os.replace``).

    Args:
        content: what to show.
        path: destination, usually ``OUT/report.html``.
        redact: strings replaced by ``[redacted]`` (see :func:`render_html`).

    Returns:
        the path written.
    """
    return write_text_atomic(path, render_html(content, redact=redact))
