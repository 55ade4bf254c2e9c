"""A small, fast stand-in for :class:`eagle.pipeline.Pipeline` for the evaluation tests.

It keeps banks on disk (one folder with a ``meta.json`` per bank, like the real store) so the bank cache can
be tested across pipeline instances, scores an image by its mean absolute grey-level difference from the
references' mean, and answers each prompt setting with a deterministic rule (including some ``unknown``).
It counts calls, so tests can check that the expert runs once per image.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from eagle.pipeline import BUILD_STAGES
from eagle.records import InspectionResult, InspectOptions


class FakeBankError(ValueError):
    """Stands in for expert.bank.BankError (a ValueError)."""


@dataclass
class FakeSummary:
    name: str
    n_references: int


class FakeStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return (self.path(name) / "meta.json").is_file()

    def load(self, name: str) -> dict:
        try:
            return json.loads((self.path(name) / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise FakeBankError(f"bank {name} unreadable: {err}") from None

    def list(self) -> list[FakeSummary]:
        if not self.root.is_dir():
            return []
        return [
            FakeSummary(p.name, self.load(p.name)["n_references"]) for p in sorted(self.root.iterdir()) if p.is_dir()
        ]

    def delete(self, name: str) -> None:
        shutil.rmtree(self.path(name))

    def reference_name(self, name: str, index: int) -> str:
        return self.load(name)["names"][index]


def _grey(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32).mean(axis=2)


@dataclass
class FakePipeline:
    """Implements the pipeline methods the evaluation uses: build_bank, banks, run_expert, finish."""

    data_dir: Path
    mllm_enabled: bool = True
    fail_after: int | None = None  # raise KeyboardInterrupt on this run_expert call (simulated kill)
    expert_calls: list[str] = field(default_factory=list)
    finish_calls: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    templates: list[tuple[str, str | None, tuple[int, ...] | None]] = field(default_factory=list)
    builds: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.banks = FakeStore(Path(self.data_dir) / "banks")

    def build_bank(self, images, name, *, progress=None):
        self.builds.append(name)
        greys = [_grey(np.asarray(Image.open(p).convert("RGB"))).mean() for p in images]
        scores = [abs(g - float(np.mean(greys))) for g in greys]
        meta = {
            "mean": float(np.mean(greys)),
            "tau": float(np.mean(scores) + 3 * np.std(scores) + 1.0),
            "s_max": float(max(scores) + 2.0),
            "n_references": len(images),
            "names": [Path(p).name for p in images],
        }
        for stage in BUILD_STAGES:
            if progress:
                progress(stage, 1.0)
        self.banks.path(name).mkdir(parents=True, exist_ok=True)
        (self.banks.path(name) / "meta.json").write_text(json.dumps(meta))
        return FakeSummary(name, len(images))

    def run_expert(self, image: np.ndarray, bank: str):
        if self.fail_after is not None and len(self.expert_calls) >= self.fail_after:
            raise KeyboardInterrupt
        meta = self.banks.load(bank)
        diff = np.abs(_grey(image) - meta["mean"])
        score = float(diff.mean())
        self.expert_calls.append(hashlib.sha256(image.tobytes()).hexdigest())
        return SimpleNamespace(
            score=score,
            tau=meta["tau"],
            s_max=meta["s_max"],
            anomalous=score >= meta["tau"],
            low_confidence=meta["tau"] <= score <= meta["s_max"],
            anomaly_map=diff,
            valid_mask=np.ones(diff.shape, bool),
            boxes=[],
            template_index=0,
            timings_ms={"embed": 1.0, "search": 0.5},
        )

    def finish(
        self,
        image,
        expert,
        bank,
        options: InspectOptions | None = None,
        *,
        image_name=None,
        template=None,
        template_name=None,
    ):
        options = options or InspectOptions()
        self.finish_calls.append((image_name, options.prompt_setting, options.caas))
        self.templates.append((image_name, template_name, None if template is None else tuple(template.shape)))
        digest = int(hashlib.sha256(f"{image_name}|{options.prompt_setting}".encode()).hexdigest(), 16)
        if options.prompt_setting == "baseline":
            answer = ("yes", "no", "unknown")[digest % 3]
        else:
            answer = "yes" if expert.anomalous else "no"
            if options.caas == "auto" and expert.low_confidence:
                answer = "no" if answer == "yes" else "yes"
        verdict = {"yes": "defect", "no": "no_defect"}.get(answer, "unknown")
        return InspectionResult(
            image_name=image_name,
            image_sha256="0" * 64,
            image_size=(image.shape[1], image.shape[0]),
            bank=bank,
            bank_id="fake",
            score=expert.score,
            tau=expert.tau,
            s_max=expert.s_max,
            expert_decision="anomalous" if expert.anomalous else "normal",
            low_confidence=expert.low_confidence,
            boxes=[],
            inspected_region=(0, 0, image.shape[1], image.shape[0]),
            mode="expert+mllm",
            prompt_setting=options.prompt_setting,
            caas_applied=options.caas == "auto" and expert.low_confidence,
            mllm_letter={"yes": "A", "no": "B"}.get(answer),
            mllm_answer=answer,
            mllm_raw=answer,
            verdict=verdict,
            model_id="fake-mllm",
            template=template_name if template is not None else self.banks.reference_name(bank, 0),
            timings_ms={**expert.timings_ms, "mllm_generate": 2.0},
        )
