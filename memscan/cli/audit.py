"""``memscan audit``: image folders in, ``summary.json`` + CSVs + a self-contained ``report.html`` out.

Thin front door to :func:`memscan.audit.audit`; exit 0 on success, 2 on bad input, 3 when ``--fail-above`` trips.
"""

from __future__ import annotations

import argparse
from typing import Any

from memscan.errors import EXIT_GATE, EXIT_OK, InputError

__all__ = ["add_parser", "run", "format_result"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``memscan audit`` on the top-level subparsers."""
    parser = subparsers.add_parser(
        "audit",
        help="audit synthetic images for copies of training patients (full pipeline + HTML report)",
        description="Preflight the image sets, train or load the encoder, embed every set, calibrate τ on "
        "train→validation, flag copies in each synthetic set and write OUT/summary.json, CSVs, embeddings, figures "
        "and a self-contained OUT/report.html.",
    )
    parser.add_argument("--train", required=True, metavar="T", help="training images: folder, CSV manifest, NIH/MRNet")
    parser.add_argument("--val", required=True, metavar="V", help="held-out real images of other patients")
    parser.add_argument("--synthetic", required=True, action="append", metavar="S",
                        help="synthetic images; repeat for several sets compared side by side")
    parser.add_argument("--synthetic-name", action="append", metavar="NAME", default=None,
                        help="name of each --synthetic set, in the same order (default: the folder name)")
    enc = parser.add_argument_group("encoder (checkpoint or bundle model; otherwise one is trained on --train)")
    enc.add_argument("--bundle", metavar="B", help="bundle folder or name (memscan_cxr_2d, memscan_knee_3d)")
    enc.add_argument("--checkpoint", metavar="C", help="encoder weights (plain state_dict)")
    enc.add_argument("--epochs", type=int, default=None, help="epochs when training an encoder")
    enc.add_argument("--image-size", type=int, nargs="+", default=None, metavar="N",
                     help="input size after preprocessing (one int, or one per axis)")
    enc.add_argument("--dims", type=int, choices=(2, 3), default=None, help="2D or 3D (default: from the data)")
    parser.add_argument("--percentile", type=float, default=95.0, help="τ percentile (default 95)")
    parser.add_argument("--headroom", type=float, default=None, metavar="H",
                        help="flag copies above τ + H·(1 − τ), H in [0, 1): fewer false alarms on new patients, "
                             "fewer copies caught (default 0.5 with best-of-aligned, 0 with every other score; 0 is "
                             "the paper's rule; docs/benchmarks/detection_candidates.md section 10)")
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="embedding precision: auto (float16 on CUDA, bfloat16 on CPUs with native bf16, else "
                        "float32; default), or one of them explicitly (recorded in summary.json)")
    parser.add_argument("--score", default=None, metavar="MODE",
                        help="similarity score: best-of-aligned (default: the best of pixel Pearson at two sizes "
                             "and the full-size pixels' rank (Spearman) correlation (calibrated on the validation "
                             "images as they are and at lower resolution; the full-size Pearson against the best "
                             "blend of two training images), the aligned high-passed "
                             "pixels of the best fused matches, the same matches bent onto the image, and in 2D those "
                             "bent matches' fused score mixed with their bent one (in 3D the fused score itself); the "
                             "best on the detection benchmark), "
                             "fused "
                             "(flip-invariant pixel + embedding features: thousands of times faster to match), "
                             "embedding (the paper's; with --headroom 0, the paper's recipe), aligned (fused, then "
                             "the best candidates re-scored after test-time alignment) or best-of (the better of "
                             "fused and pixel Pearson per pair)")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N")
    parser.add_argument("--controls", type=int, default=None, metavar="N",
                        help="positive controls: perturbed training images that must be caught (default 8; 0 = off)")
    parser.add_argument("--fail-above", type=float, default=None, metavar="FRAC",
                        help="release gate: exit 3 when any set's copy fraction exceeds FRAC")
    parser.add_argument("--export-clean", metavar="DIR", default=None,
                        help="copy the synthetic files that are not copies here (names and formats kept)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing audit in OUT")
    data = parser.add_argument_group("data")
    data.add_argument("--layout", default="auto", help="auto, folder, manifest, nih, mrnet")
    data.add_argument("--subject-regex", default=None, help="regex capturing the patient id from file paths")
    data.add_argument("--strict", action="store_true", help="stop at the first unusable file instead of skipping")
    parser.add_argument("--batch-size", type=int, default=16, help="embedding batch size (default 16)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap draws (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of controls, bootstrap, null split, k-means")
    parser.add_argument("--out", required=True, metavar="OUT", help="output folder (new or empty)")
    parser.set_defaults(run=run)
    return parser


def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


def format_result(result: Any) -> str:
    """A few lines per synthetic set: copies, memorized images and patients, verdict; then where the report is."""
    from memscan.audit import CORRELATION_SCORES
    from memscan.report.tables import threshold_rule, verdict

    s = result.summary
    score = (s.get("provenance") or {}).get("config", {}).get("score", "embedding")
    what = "correlation" if score in CORRELATION_SCORES else f"{score} score"
    lines = [f"τ = {s['threshold']:.4f} ({threshold_rule(s)} of {s['n_train']} training images' best "
             f"validation {what}; {s['n_val']} validation images)"]
    controls = s.get("controls") or {}
    if controls.get("n"):
        lines.append(f"positive controls caught: {controls.get('n_caught', 0)} of {controls['n']}")
    for name, block in s["synthetic_sets"].items():
        level, _ = verdict(block)
        lines.append(f"[{name}] copies: {block['n_copies_synthetic']}/{block['n_synthetic']} = "
                     f"{_pct(block['frac_copies_synthetic'])}; memorized training images: "
                     f"{block['n_memorized_train']}/{block['n_train']}; patients with ≥1 copy: "
                     f"{block.get('n_memorized_subjects')}/{block.get('n_train_subjects')}; verdict: {level}")
    if s.get("n_skipped"):
        lines.append(f"skipped files: {s['n_skipped']} (see skipped.csv)")
    for warning in s.get("warnings", []):
        lines.append(f"warning: {warning}")
    lines.append(f"report: {result.report_path}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the audit from parsed arguments; returns the exit code."""
    from memscan.audit import DEFAULT_CONTROLS, DEFAULT_SCORE, audit

    names = args.synthetic_name or []
    if names and len(names) != len(args.synthetic):
        raise InputError("--synthetic-name", f"{len(names)} name(s) for {len(args.synthetic)} --synthetic set(s); "
                                             f"give one per set, in order")
    synthetic: Any = dict(zip(names, args.synthetic)) if names else list(args.synthetic)
    if names and len(set(names)) != len(names):
        raise InputError("--synthetic-name", "names must be different")
    image_size = None
    if args.image_size:
        image_size = args.image_size[0] if len(args.image_size) == 1 else args.image_size
    result = audit(
        args.train, args.val, synthetic, out_dir=args.out, checkpoint=args.checkpoint, bundle=args.bundle,
        epochs=args.epochs, image_size=image_size, spatial_dims=args.dims, percentile=args.percentile,
        headroom=args.headroom,
        device=args.device, controls=DEFAULT_CONTROLS if args.controls is None else args.controls,
        fail_above=args.fail_above, export_clean=args.export_clean, overwrite=args.overwrite, layout=args.layout,
        subject_regex=args.subject_regex, strict=args.strict, batch_size=args.batch_size, n_bootstrap=args.bootstrap,
        seed=args.seed, score=args.score or DEFAULT_SCORE, precision=args.precision,
    )
    print(format_result(result))
    if result.gate_failed:
        print(f"memscan audit: release gate failed: copy fraction above {args.fail_above:g}")
        return EXIT_GATE
    return EXIT_OK
