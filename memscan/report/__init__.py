"""Report of a memorization audit: tables and verdicts, figures (matplotlib Agg), a self-contained HTML page."""

from __future__ import annotations

from memscan.report.figures import PairImage, display_slices, figure_to_png, plot_distributions, plot_pair_gallery
from memscan.report.html import ReportContent, ReportSection, render_html, write_report
from memscan.report.tables import (comparison_table, format_fraction, ranked_pairs, set_headline, threshold_rule,
                                   verdict)

__all__ = [
    "PairImage",
    "display_slices",
    "figure_to_png",
    "plot_distributions",
    "plot_pair_gallery",
    "ReportContent",
    "ReportSection",
    "render_html",
    "write_report",
    "comparison_table",
    "format_fraction",
    "ranked_pairs",
    "set_headline",
    "threshold_rule",
    "verdict",
]
