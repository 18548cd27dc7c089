"""Which predicted cases a person should open: a case score and a threshold chosen on cross-validation.

``MODEL_FOLDER/review.json`` (written by :meth:`ReviewRule.write`, e.g. by the cross-validation analysis in
``benchmarks/uncertainty_cv501.py``) holds the score to use (one of
:data:`spinediff.metrics.case_uncertainty.SCORES`), the threshold above which a case is flagged, how that
threshold was chosen, and the expected volume of each label (medians of the training labels) that the
``level_anomaly`` score compares with. ``spinediff predict --save-uncertainty`` reads it, adds each case's
score and flag to ``CASE_uncertainty.json``, writes ``review.csv`` (most doubtful first) and names the flagged
cases at the end of the run.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from spinediff.errors import SpineDiffError
from spinediff.io import read_json, write_json, write_text
from spinediff.metrics.case_uncertainty import SCORES

REVIEW_FILE = "review.json"
REVIEW_TABLE = "review.csv"


@dataclass(frozen=True)
class ReviewRule:
    score: str
    threshold: float
    expected_volumes_ml: dict[int, float] = field(default_factory=dict)
    chosen: dict = field(default_factory=dict)  # how: rule, cases, failures, the cross-validation it came from

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise SpineDiffError(f"review score {self.score!r} is not one of {', '.join(SCORES)}.")

    @classmethod
    def read(cls, model_folder: str | Path) -> ReviewRule | None:
        """The model's rule, or None when it has none (no flag is then given)."""
        path = Path(model_folder) / REVIEW_FILE
        if not path.is_file():
            return None
        data = read_json(path)
        try:
            return cls(str(data["score"]), float(data["threshold"]),
                       {int(k): float(v) for k, v in data.get("expected_volumes_ml", {}).items()},
                       dict(data.get("chosen", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise SpineDiffError(f"{path} is not a review rule ({type(exc).__name__}: {exc}); write it again or "
                                 "move it aside to predict without review flags.") from None

    def write(self, model_folder: str | Path) -> Path:
        path = Path(model_folder) / REVIEW_FILE
        write_json({"score": self.score, "threshold": self.threshold,
                    "expected_volumes_ml": {str(k): v for k, v in self.expected_volumes_ml.items()},
                    "chosen": self.chosen}, path)
        return path

    def flag(self, scores: dict) -> dict:
        """``{"score", "value", "threshold", "review"}`` for one case's scores (``review`` True: open it)."""
        value = scores.get(self.score)
        if value is None:
            raise SpineDiffError(f"the review rule asks for {self.score!r}, which this prediction did not give "
                                 f"(it gave {', '.join(k for k in scores if k in SCORES)}); predict with more "
                                 "than one sample, or choose another score.")
        return {"score": self.score, "value": float(value), "threshold": self.threshold,
                "review": bool(value > self.threshold)}


def review_table(flags: dict[str, dict]) -> str:
    """CSV text of the cases' flags, the most doubtful first."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case", "score", "value", "threshold", "review"])
    for case, flag in sorted(flags.items(), key=lambda item: -item[1]["value"]):
        writer.writerow([case, flag["score"], f"{flag['value']:.6g}", f"{flag['threshold']:.6g}",
                         "yes" if flag["review"] else "no"])
    return buffer.getvalue()


def write_review_table(flags: dict[str, dict], path: str | Path) -> Path:
    """Write :func:`review_table` to ``path`` (``OUTPUT/review.csv``)."""
    write_text(review_table(flags), path)
    return Path(path)
