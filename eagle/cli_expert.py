"""``eagle build-bank``, ``eagle score`` and ``eagle warm-cache``: the PatchCore expert from the command line.

``build-bank`` reads every image under ``--normals`` (recursively), builds a bank (embed → coreset →
DBT → save, one progress bar on stderr unless ``--no-progress``) and prints a summary. Unreadable reference
files are listed one line each and, by default, NOTHING is built (exit 1): a bank must never hold fewer
images than the user thinks. ``--skip-unreadable`` builds from the readable ones instead, with a warning per
skipped file and the count used in the summary.

``score`` scores each image against a bank: score, τ, s_max, decision, low-confidence flag, boxes in
original pixel coordinates and the template (most similar reference). A bad file gets one line on
stderr, the others are still scored, and the exit code is 1. A missing or invalid bank: one line, exit 2.

Example:
    $ eagle build-bank --normals data/widget/train/good --name widget
    $ eagle score --bank ~/.local/share/eagle/banks/widget data/widget/test/*/*.png --json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from eagle.errors import CommandError
from eagle.settings import Settings

log = logging.getLogger("eagle.cli")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``build-bank``, ``score`` and ``warm-cache`` to the ``eagle`` parser."""
    build = subparsers.add_parser(
        "build-bank",
        help="Build an expert bank from a folder of normal (defect-free) reference images.",
        description="Build an expert bank (memory bank, DBT threshold, ONNX backbone, reference copies) from "
        "normal images. Unreadable files abort the build unless --skip-unreadable is given.",
    )
    build.add_argument("--normals", required=True, type=Path, help="Folder of normal images (searched recursively).")
    build.add_argument("--name", required=True, help="Bank name: letters, digits, '.', '_' or '-' (max 64).")
    build.add_argument("--out", type=Path, default=None, help="Bank directory (default: <data_dir>/banks/NAME).")
    build.add_argument(
        "--skip-unreadable",
        action="store_true",
        help="Build from the readable images when some files cannot be read (each skipped file is listed).",
    )
    build.add_argument(
        "--mask",
        type=Path,
        default=None,
        metavar="FILE.png|FILE.json",
        help="Inspection mask in original-image pixels: a binary PNG (white = inspected) or polygons JSON "
        '({"width": W, "height": H, "polygons": [[[x, y], ...], ...]}); patches outside never count '
        "(docs/bank-format.md).",
    )
    build.add_argument("--json", action="store_true", help="Print the summary as one JSON object.")
    build.add_argument("--no-progress", action="store_true", help="No progress bar on stderr.")
    build.set_defaults(func=run_build_bank)

    score = subparsers.add_parser(
        "score",
        help="Score images against a bank (expert only).",
        description="Score images with the PatchCore expert: score, tau, s_max, decision, low-confidence flag, "
        "boxes (original pixel coordinates) and the template reference.",
    )
    score.add_argument("--bank", required=True, type=Path, help="Bank directory (as written by build-bank).")
    score.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="Image files to score.")
    score.add_argument("--json", action="store_true", help="One JSON object per line instead of a table.")
    score.set_defaults(func=run_score)

    warm = subparsers.add_parser(
        "warm-cache",
        help="Export the expert's ONNX backbone into the cache now, so bank builds skip the 10-20 s export.",
        description="Load the configured backbone weights and export its ONNX graph into the cache "
        "(EAGLE_ONNX_CACHE_DIR, default <data_dir>/cache/onnx; nothing to do when a verified graph for these "
        "weights, crop, opset and torch version is there). The container build and the app's start-up run it; "
        "builds use the cached graph.",
    )
    warm.add_argument(
        "--prune", action="store_true", help="Also remove cached graphs of other weights, crops or torch versions."
    )
    warm.set_defaults(func=run_warm_cache)


def run_warm_cache(args: argparse.Namespace, settings: Settings) -> int:
    """Handler of ``eagle warm-cache``: put the configured backbone's ONNX graph in the cache."""
    from eagle.pipeline import Pipeline

    started = time.perf_counter()
    path = Pipeline(settings).warm_onnx_cache(prune=args.prune)  # missing weights: one line, exit 2 (eagle.cli.main)
    print(f"ONNX backbone cached: {path} ({path.stat().st_size / 2**20:.0f} MB, {time.perf_counter() - started:.1f} s)")
    return 0


# --------------------------------------------------------------------------------------------- build-bank
class _StageTimer:
    """A progress callback that records when each stage started and finished."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str, fraction: float) -> None:
        now = time.perf_counter()
        self.started.setdefault(stage, now)
        if fraction >= 1.0:
            self.seconds[stage] = now - self.started[stage]


def run_build_bank(args: argparse.Namespace, settings: Settings) -> int:
    """Handler of ``eagle build-bank``: :meth:`eagle.pipeline.Pipeline.build_bank` with the command's options.

    ``--skip-unreadable`` and ``--out`` are the pipeline's ``skip_unreadable`` and ``out_dir``; every unreadable
    file is one line on stderr, and without ``--skip-unreadable`` nothing is built (exit 1).
    """
    from eagle.bank_service import BUILD_STAGES, ReferenceImagesError
    from eagle.banks import validate_bank_name
    from eagle.images import list_images
    from eagle.pipeline import Pipeline
    from eagle.progress_bars import StageBar, fan_out
    from expert.bank import read_meta

    validate_bank_name(args.name)
    if not args.normals.is_dir():
        raise CommandError(f"--normals {str(args.normals)!r} is not a directory")
    mask = getattr(args, "mask", None)
    if mask is not None and not mask.is_file():
        raise CommandError(f"--mask {str(mask)!r} is not a file")
    paths = list_images(args.normals)
    names = [path.relative_to(args.normals).as_posix() for path in paths]
    out_dir = args.out.expanduser() if args.out else None
    unreadable: list[str] = []  # printed once the bar is closed, one line each
    timer = _StageTimer()
    bar = StageBar(BUILD_STAGES, desc=f"bank {args.name}", enabled=not args.no_progress)
    try:
        Pipeline(settings).build_bank(
            paths,
            args.name,
            names=names,
            progress=fan_out(timer, bar),
            skip_unreadable=args.skip_unreadable,
            on_unreadable=unreadable.append,
            out_dir=out_dir,
            mask=mask,
        )
    except ReferenceImagesError as err:
        raise CommandError(
            f"{len(err.problems)} of {err.total} reference files could not be read; nothing was built "
            "(fix or remove them, or pass --skip-unreadable to build from the other images)",
            exit_code=1,
        ) from None
    finally:
        bar.close()
        label = "skipped" if args.skip_unreadable else "unreadable"
        for message in unreadable:
            print(f"eagle build-bank: {label}: {message}", file=sys.stderr)
    directory = out_dir or settings.banks_dir / args.name
    summary = _bank_summary(read_meta(directory), directory, n_files=len(paths), stage_seconds=timer.seconds)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return 0


def _bank_summary(meta, directory: Path, *, n_files: int, stage_seconds: dict[str, float]) -> dict[str, Any]:
    return {
        "name": meta.name,
        "path": str(directory),
        "bank_id": meta.bank_id,
        "references": meta.counts.references,
        "files": n_files,
        "skipped_files": n_files - meta.counts.references,
        "used_for_dbt": meta.counts.used_for_dbt,
        "patches": meta.counts.patches,
        "coreset_size": meta.counts.coreset,
        "threshold_method": meta.threshold.method,
        "tau": meta.threshold.tau,
        "s_max": meta.threshold.s_max,
        "distance": meta.distance,
        "weights": meta.backbone.weights_source,
        "mask": None if meta.mask is None else {"patches": meta.mask.patches, "source": meta.mask.source},
        "warnings": list(meta.warnings),
        "seconds": {stage: round(value, 3) for stage, value in stage_seconds.items()},
    }


def _mask_line(mask: dict[str, Any] | None, per_image: int) -> str:
    if mask is None:
        return "none (every patch inspected)"
    return f"{mask['patches']} of {per_image} patches inspected ({mask['source']})"


def _caas_band(tau: float, s_max: float) -> str:
    """The low-confidence band [tau, s_max] in which CAAS turns on, or why there is none."""
    if tau > s_max:
        return "empty (tau > s_max): CAAS never turns on (see the warning below)"
    return f"[{tau:.6g}, {s_max:.6g}]"


def _print_summary(summary: dict[str, Any]) -> None:
    skipped = f" ({summary['skipped_files']} unreadable files skipped)" if summary["skipped_files"] else ""
    share = 100.0 * summary["coreset_size"] / max(1, summary["patches"])
    rows = [
        ("bank", summary["name"]),
        ("path", summary["path"]),
        ("references", f"{summary['references']} images used of {summary['files']} files{skipped}"),
        ("patches", f"{summary['patches']}"),
        ("coreset", f"{summary['coreset_size']} patches ({share:.1f} %)"),
        ("mask", _mask_line(summary["mask"], summary["patches"] // max(1, summary["references"]))),
        ("threshold", f"{summary['threshold_method']} ({summary['distance']} distance)"),
        ("dbt images", f"{summary['used_for_dbt']} of {summary['references']}"),
        ("tau", f"{summary['tau']:.6g}"),
        ("s_max", f"{summary['s_max']:.6g}"),
        ("caas band", _caas_band(summary["tau"], summary["s_max"])),
        ("weights", summary["weights"]),
        ("time", ", ".join(f"{stage} {sec:.1f} s" for stage, sec in summary["seconds"].items())),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for warning in summary["warnings"]:
        print(f"warning: {warning}")


# --------------------------------------------------------------------------------------------- score
def _result_record(path: Path, result) -> dict[str, Any]:
    width, height = result.original_size
    return {
        "image": str(path),
        "width": int(width),
        "height": int(height),
        "score": float(result.score),
        "tau": float(result.tau),
        "s_max": float(result.s_max),
        "decision": "anomalous" if result.anomalous else "normal",
        "low_confidence": bool(result.low_confidence),
        "boxes": [
            {"x0": int(b.x0), "y0": int(b.y0), "x1": int(b.x1), "y1": int(b.y1), "peak": float(b.peak)}
            for b in result.boxes
        ],
        "inspected_region": list(result.geometry.inspected_region()),
        "template_index": int(result.template_index),
        "template": result.template_name,
        "timings_ms": {stage: round(ms, 3) for stage, ms in result.timings_ms.items()},
    }


def _format_number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _print_table(records: list[dict[str, Any]]) -> None:
    header = ("image", "score", "tau", "s_max", "decision", "unsure", "template", "boxes (x0,y0,x1,y1)")
    rows = [
        (
            r["image"],
            _format_number(r["score"]),
            _format_number(r["tau"]),
            _format_number(r["s_max"]),
            r["decision"],
            "yes" if r["low_confidence"] else "no",
            r["template"] or "-",
            " ".join(f"({b['x0']},{b['y0']},{b['x1']},{b['y1']})" for b in r["boxes"]) or "-",
        )
        for r in records
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(f"{str(cell):<{widths[i]}}" for i, cell in enumerate(row)).rstrip())


def run_score(args: argparse.Namespace, settings: Settings) -> int:
    """Handler of ``eagle score``: the expert part of :class:`~eagle.pipeline.Pipeline` (decode, then score).

    The bank is loaded as every front end loads it (:meth:`eagle.banks.BankStore.load`: checked and
    test-inspected); a bank that cannot be used is one line and exit 2, with the same message as the app and API.
    """
    from eagle.errors import as_eagle_error, one_line
    from eagle.images import ImageError
    from eagle.pipeline import Pipeline

    bank_dir = args.bank.expanduser()
    if not bank_dir.is_dir():
        raise CommandError(f"bank {str(bank_dir)!r} not found (not a directory); build one with eagle build-bank")
    settings.mllm.enabled = False  # expert only: the MLLM stack is never imported, the view is the expert's
    pipeline = Pipeline(settings, banks_dir=bank_dir.parent)
    bank = bank_dir.name
    try:
        if not pipeline.banks.exists(bank):
            raise CommandError(f"{str(bank_dir)!r} is not a bank (no meta.json); build one with eagle build-bank")
        pipeline.banks.load(bank)
    except CommandError:
        raise
    except Exception as err:  # a known failure gets the bank's path in front of its line; a bug re-raises
        known = as_eagle_error(err)
        if known is None:
            raise
        raise CommandError(f"bank {str(bank_dir)!r}: {one_line(known)}", exit_code=known.exit_code) from None
    failed = 0
    records: list[dict[str, Any]] = []
    for path in args.images:
        try:
            # Decoded reduced when large (bounded memory); boxes stay in ORIGINAL pixels.
            image = pipeline.decode(path, image_name=str(path))
            record = _result_record(path, pipeline.run_expert(image, bank))
        except ImageError as err:
            failed += 1
            print(f"eagle score: error: {err}", file=sys.stderr)
            continue
        except Exception as err:  # noqa: BLE001 - one bad file must not stop the others
            failed += 1
            log.debug("scoring %s failed", path, exc_info=True)
            print(f"eagle score: error: {path}: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            records.append(record)
    if not args.json and records:
        _print_table(records)
    if failed:
        print(f"eagle score: {failed} of {len(args.images)} images failed", file=sys.stderr)
    return 1 if failed else 0
