"""``eagle eval`` and ``eagle eval-merge``: batch evaluation that reproduces the paper's tables.

Example:
    $ eagle eval --dataset mvtec --root /data/mvtec --out runs/mvtec
    $ eagle eval --dataset visa --root /data/VisA --settings full,full+caas --shard 0/4 --out runs/visa-0
    $ eagle eval-merge runs/visa-0 runs/visa-1 runs/visa-2 runs/visa-3 --out runs/visa
    $ eagle eval --dataset mvtec --root /shared/mvtec --out /shared/runs/mvtec --executor ray --address auto
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from eagle.errors import CommandError
from eagle.evaluation.aggregate import DATASET_TITLES, ReportError, build_report
from eagle.evaluation.metrics import PAPER_UNPARSED_RULE, UNPARSED_RULES
from eagle.evaluation.profile import DEFAULT_PROFILE, PROFILES, resolve_profile
from eagle.evaluation.readers import DATASET_KINDS, DatasetError
from eagle.evaluation.records import RecordsError
from eagle.evaluation.report import write_report
from eagle.evaluation.runner import (
    DEFAULT_PIXEL_SIZE,
    DEFAULT_SETTINGS,
    MMAD_QUESTION_MODES,
    EvalConfig,
    EvalConfigError,
    EvalRunner,
    bank_root,
    parse_settings,
)
from eagle.evaluation.shards import Shard, ShardError
from eagle.settings import Settings
from mllm.config import ANSWER_PARSERS

log = logging.getLogger("eagle.cli")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` and ``eval-merge`` to the ``eagle`` parser."""
    run = subparsers.add_parser(
        "eval",
        help="Evaluate on MVTec-AD / VisA / MMAD / a good+bad folder and write the paper's tables.",
        description="Per class: build (or reuse) a bank, score every test image once, ask the MLLM under each "
        "setting; records are appended as they finish (rerun with the same --out to resume).",
    )
    run.add_argument("--dataset", required=True, choices=DATASET_KINDS, help="Data set layout.")
    run.add_argument("--root", required=True, type=Path, help="Data set folder.")
    run.add_argument("--classes", nargs="+", default=None, help="Classes to evaluate (space or comma separated).")
    run.add_argument(
        "--settings",
        default=DEFAULT_SETTINGS,
        help="Comma-separated settings: baseline, visual_all (the paper's visual-only row: boxes on every image), "
        "visual (ours: boxes only when the expert says anomalous), textual, full, each optionally +caas "
        f"(default {DEFAULT_SETTINGS}).",
    )
    run.add_argument("--model", default=None, help="MLLM preset (default: EAGLE_MLLM__PRESET).")
    run.add_argument("--no-mllm", action="store_true", help="Expert-only: skip the MLLM, compute expert metrics only.")
    run.add_argument("--out", type=Path, default=None, help="Output folder (default eagle-eval/<dataset>).")
    run.add_argument("--shard", default="0/1", help="Run shard i of n (0-based), e.g. 0/4; merge with eval-merge.")
    run.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local (default): this process; ray: one task per class builds its bank, actors inspect the images "
        "(see docs/evaluation.md, 'On a Ray cluster').",
    )
    run.add_argument(
        "--address",
        default=None,
        help="Ray cluster for --executor ray (auto, ray://head:10001, host:6379; default RAY_ADDRESS, else a "
        "Ray instance started on this machine).",
    )
    run.add_argument("--actors", type=int, default=None, help="Ray inspection actors (default: fill the cluster).")
    run.add_argument(
        "--gpus-per-actor",
        type=float,
        default=None,
        help="GPUs each Ray actor reserves (default 1 where the cluster has GPUs and EAGLE_MLLM__DEVICE is not cpu).",
    )
    run.add_argument("--limit", type=int, default=None, help="At most N test images per class (a stable sample).")
    run.add_argument(
        "--pixel-size",
        type=int,
        default=DEFAULT_PIXEL_SIZE,
        help=f"Longest side for pixel AUROC/AUPRO maps (default {DEFAULT_PIXEL_SIZE}; 0 = mask resolution).",
    )
    run.add_argument("--no-pixel", action="store_true", help="Skip pixel metrics (no anomaly maps stored).")
    run.add_argument(
        "--bank-dir",
        type=Path,
        default=None,
        help="Bank CACHE folder: where the built banks are stored and reused (default <out>/cache); not where "
        "their images come from (see --bank-root).",
    )
    run.add_argument(
        "--bank-root",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="MMAD: the ORIGINAL data set whose normal training images build the banks of MMAD data set NAME "
        "(DS-MVTec=/data/mvtec, MVTec-AD=..., VisA=..., MVTec-LOCO=..., GoodsAD=...; reads DIR/<class>/train/good, "
        "VisA also its split_csv); repeatable. Unlike --bank-dir (the cache of built banks), this is where the "
        "bank IMAGES come from.",
    )
    run.add_argument(
        "--bank-from-templates",
        action="store_true",
        help="MMAD: build a class's bank from the templates mmad.json lists when no training images are found "
        "(NOT the reference's banks; the report's heading says so). Without it such a class is an error.",
    )
    run.add_argument(
        "--mmad-questions",
        choices=MMAD_QUESTION_MODES,
        default="detection",
        help="MMAD: detection (default, the paper's: the item's Anomaly Detection question) or all (every question "
        "of the item's conversation, each asked alone with the same prompt setting; the report adds MMAD's "
        "per-type table).",
    )
    run.add_argument("--no-progress", action="store_true", help="No progress bars.")
    run.add_argument("--no-plots", action="store_true", help="Skip the PNG plots.")
    _add_unparsed(run)
    run.add_argument(
        "--profile",
        choices=tuple(PROFILES),
        default=DEFAULT_PROFILE,
        help="paper (default): the paper's reading (1-shot+ template, its instruction, our box merge and answer "
        "parser); reference: the reference code's published choices (no template, its instruction_sample text, "
        "its one-pass box merge, its last-letter-else-closest-option parser). Recorded in run.json.",
    )
    run.add_argument(
        "--parser",
        choices=ANSWER_PARSERS,
        default=None,
        help="Replace the profile's answer parser: eagle (letter, else keywords, else unknown), reference (last "
        "standalone A-E, else the closest option text), keyword (the paper's text: yes/abnormal/defect words first). "
        "MMAD items are read against their own options: reference as above; eagle and keyword by letter, then "
        "option text, then yes/no keywords (mllm.choices).",
    )
    run.set_defaults(func=run_eval)

    merge = subparsers.add_parser(
        "eval-merge",
        help="Combine the records of several eval output folders (shards) into one report.",
    )
    merge.add_argument("runs", nargs="+", type=Path, metavar="OUT_DIR", help="Output folders of `eagle eval`.")
    merge.add_argument("--out", type=Path, required=True, help="Folder for the merged report.")
    merge.add_argument("--no-plots", action="store_true", help="Skip the PNG plots.")
    _add_unparsed(merge)
    merge.set_defaults(func=run_merge)


def _add_unparsed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--unparsed",
        choices=UNPARSED_RULES,
        default=PAPER_UNPARSED_RULE,
        help="How answers that parse to neither yes nor no enter the paper tables: drop (default, the paper's "
        "reference summary: left out of the counts) or wrong (a miss on an anomalous image, a false alarm on a "
        "normal one). Every row prints their number; report.json carries both rules.",
    )


def _classes(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [c for value in values for c in value.split(",") if c.strip()]


def parse_bank_roots(values: list[str] | None) -> dict[str, Path]:
    """``["DS-MVTec=/data/mvtec", ...]`` → ``{"DS-MVTec": Path("/data/mvtec"), ...}``.

    Raises:
        EvalConfigError: a value without ``NAME=DIR``, or a NAME given twice.
    """
    roots: dict[str, Path] = {}
    for value in values or []:
        name, sep, directory = value.partition("=")
        name, directory = name.strip(), directory.strip()
        if not sep or not name or not directory:
            raise EvalConfigError(f"--bank-root {value!r}: expected NAME=DIR, e.g. DS-MVTec=/data/mvtec")
        if name in roots:
            raise EvalConfigError(f"--bank-root {name} is given twice")
        roots[name] = Path(directory)
    return roots


def build_config(args: argparse.Namespace) -> EvalConfig:
    """Turn parsed ``eagle eval`` arguments into an :class:`EvalConfig` (raises on bad values)."""
    return EvalConfig(
        dataset=args.dataset,
        root=args.root,
        out=args.out or Path("eagle-eval") / args.dataset,
        classes=_classes(args.classes),
        settings=parse_settings(args.settings),
        shard=Shard.parse(args.shard),
        limit=args.limit,
        pixel_metrics=not args.no_pixel,
        pixel_size=args.pixel_size or None,
        bank_dir=args.bank_dir,
        progress=not args.no_progress,
        plots=not args.no_plots,
        unparsed=getattr(args, "unparsed", PAPER_UNPARSED_RULE),
        profile=resolve_profile(getattr(args, "profile", DEFAULT_PROFILE), parser=getattr(args, "parser", None)),
        mmad_questions=getattr(args, "mmad_questions", "detection"),
        bank_roots=parse_bank_roots(getattr(args, "bank_root", None)),
        bank_from_templates=getattr(args, "bank_from_templates", False),
    )


def _summary_lines(report: dict) -> list[str]:
    """The paper-table numbers (class means, the paper's definitions) per data set, one line per row."""
    rule = report["meta"].get("unparsed", PAPER_UNPARSED_RULE)
    count = "dropped" if rule == "drop" else "unparsed"
    lines = []
    for dataset, data in report["metrics"].items():
        meta = report["meta"]["datasets"][dataset]
        title = DATASET_TITLES.get(dataset, dataset)
        mean = data["mean"]
        auroc = "–" if mean["image_auroc"] is None else f"{100 * mean['image_auroc']:.1f}"
        state = "" if meta["complete"] else "  [incomplete]"
        lines.append(f"{title}: {meta['n_images']} images, expert image AUROC {auroc}{state}")
        if meta.get("bank_from_templates"):
            lines.append(
                "  banks built from the templates mmad.json lists (--bank-from-templates), not the reference's"
            )
        lines.append(
            "  mean over classes (the paper's definitions: Acc = balanced accuracy); unparseable answers "
            + ("dropped" if rule == "drop" else "counted wrong")
        )
        for setting, m in [("expert", mean["expert"]), *mean["settings"].items()]:
            if m:
                lines.append(
                    f"  {setting:<14} acc {100 * m['balanced_accuracy']:5.1f}  prec {100 * m['precision']:5.1f}  "
                    f"rec {100 * m['recall']:5.1f}  F1 {100 * m['f1']:5.1f}  {count} {m['n_unknown']}"
                )
        if not meta["mllm_enabled"]:
            lines.append("  MLLM disabled: expert metrics only")
    return lines


def run_eval(args: argparse.Namespace, settings: Settings) -> int:
    """Handler of ``eagle eval``."""
    try:
        config = build_config(args)
    except (EvalConfigError, ShardError) as err:
        raise CommandError(str(err)) from None
    executor = getattr(args, "executor", "local")
    ray_args = {name: getattr(args, name, None) for name in ("address", "actors", "gpus_per_actor")}
    if executor != "ray" and any(value is not None for value in ray_args.values()):
        raise CommandError("--address, --actors and --gpus-per-actor need --executor ray")
    settings.data_dir = bank_root(config)
    if args.model:
        settings.mllm.preset = args.model
    if args.no_mllm:
        settings.mllm.enabled = False
    settings = config.profile.apply(settings)
    from eagle.bank_service import ReferenceImagesError
    from eagle.models import MLLMUnavailableError
    from eagle.pipeline import Pipeline

    try:
        if executor == "ray":
            from eagle.evaluation.ray_executor import RayEvalRunner, RayOptions

            runner = RayEvalRunner(settings, config, options=RayOptions(**ray_args))
        else:
            runner = EvalRunner(Pipeline(settings), settings, config)
        report = runner.run()
    except (DatasetError, EvalConfigError, RecordsError, ReportError, MLLMUnavailableError) as err:
        raise CommandError(str(err)) from None
    except ReferenceImagesError as err:
        raise CommandError(str(err), exit_code=1) from None
    for line in _summary_lines(report):
        print(line)
    print(f"report: {config.out / 'report.md'}")
    return 0


def run_merge(args: argparse.Namespace, settings: Settings) -> int:
    """Handler of ``eagle eval-merge``."""
    try:
        report = build_report(args.runs, unparsed=getattr(args, "unparsed", PAPER_UNPARSED_RULE))
        write_report(report, args.out, plots=not args.no_plots)
    except (ReportError, RecordsError) as err:
        raise CommandError(str(err)) from None
    for line in _summary_lines(report):
        print(line)
    print(f"report: {args.out / 'report.md'}")
    return 0
