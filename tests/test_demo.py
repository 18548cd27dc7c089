"""`spinediff demo --quick`: the whole pipeline end to end, and its report rendered by Chromium."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from spinediff.cli import main


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """The quick demo's output folder; what it printed (stdout and stderr) is kept in ../console.txt."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "out"
    console = io.StringIO()
    with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
        status = main(["demo", "--quick", "-o", str(out)])
    (out.parent / "console.txt").write_text(console.getvalue())
    assert status == 0, console.getvalue()[-3000:]
    return out


def test_quick_demo_console_is_short_with_an_eta(quick_demo):
    """One line per stage with elapsed time and ETA, one per training epoch, then the results: under 80 lines
    (nnU-Net's own log stays in each fold's log file)."""
    lines = [line for line in (quick_demo.parent / "console.txt").read_text().replace("\r", "\n").splitlines()
             if line.strip()]
    assert len(lines) < 80, "\n".join(lines)
    stage_lines = [line for line in lines if line.startswith("[demo] ") and "ETA" in line]
    assert len(stage_lines) == 8 and stage_lines[-1].endswith("ETA 0:00")
    assert any("epoch 1/" in line and "ETA" in line for line in lines)  # the trainings' epoch lines
    assert not any("Yayy" in line or "Current learning rate" in line for line in lines)  # nnU-Net's log


def test_quick_demo_runs_every_stage_and_scores_every_method(quick_demo):
    summary = json.loads((quick_demo / "demo_summary.json").read_text())
    for stage in ("phantom", "register", "validate", "plan + preprocess", "train + validate (segmentation)",
                  "train + validate (translation)", "predict with uncertainty", "evaluate + report"):
        assert stage in summary["stages_seconds"]
    assert summary["registration"]["failed"] == 0 and summary["registration"]["median_tre_mm"] < 2.0
    assert set(summary["segmentation"]) == {"nnU-Net 2D", "Diffusion segmentation 2D"}
    for scores in summary["segmentation"].values():
        assert 0.0 <= scores["dice"] <= 1.0
    for scores in summary["translation"].values():
        assert np.isfinite(scores["psnr"]) and scores["mae_body"] > 0
    from spinediff.experiments.demo import BASELINE_GLOBAL, BASELINE_ORACLE

    # the oracle is the least-squares fit to each case's own CT: no map fitted on other cases has a smaller
    # squared error (clipping to the data range only brings values closer to the reference)
    oracle, shared = summary["translation"][BASELINE_ORACLE], summary["translation"][BASELINE_GLOBAL]
    assert oracle["psnr"] >= shared["psnr"] - 0.01
    # downstream Dice: the CT segmenter scored every translation method and the real CT
    assert 0.0 <= summary["translation_downstream_dice_real_ct"] <= 1.0
    for method in ("Regression U-Net 2D", "Diffusion image mode (x0) 2D"):
        assert 0.0 <= summary["translation"][method]["dice_downstream"] <= 1.0
    html = (quick_demo / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5  # self-contained: figures embedded
    assert "src='figures" not in html and "Segmentation: diffusion vs nnU-Net" in html
    import base64
    import io
    import re

    import matplotlib.image

    for data in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html):
        image = matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert image.shape[0] > 50 and image.shape[1] > 50  # every embedded figure decodes


def test_quick_demo_refuses_to_overwrite(quick_demo, capsys):
    assert main(["demo", "--quick", "-o", str(quick_demo)]) == 2
    assert "already exists" in capsys.readouterr().err


NO_CHROMIUM = "Debian chromium is not installed (setup_scripts/install.sh installs it when run as root)"


@pytest.mark.skipif(shutil.which("chromium") is None, reason=NO_CHROMIUM)
def test_report_renders_in_headless_chromium_with_every_image_loaded(quick_demo):
    import matplotlib.image

    from spinediff.evaluation.report import screenshot

    shot = screenshot(quick_demo / "report.html", quick_demo / "report.png", height=3000)
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[1] == 1200
    # Images drawn: the page is not just white text background (grey-level variety in the figure area).
    assert pixels[..., :3].std() > 0.1


def _benchmark_folder(demo_output, task_dataset: str = "SpinePhantomSeg"):
    found = [p.parent for p in demo_output.rglob("benchmark.json") if task_dataset in str(p)]
    assert found, f"the demo wrote no benchmark for {task_dataset}"
    return found[0]


@pytest.mark.skipif(shutil.which("chromium") is None, reason=NO_CHROMIUM)
def test_report_of_a_benchmark_folder_renders_every_image_in_chromium(quick_demo, tmp_path, capsys):
    from spinediff.evaluation.report import loaded_images

    bench = _benchmark_folder(quick_demo)
    out = tmp_path / "report"
    assert main(["report", "-i", str(bench), "-o", str(out)]) == 0
    html = (out / "report.html").read_text()
    # the benchmark's methods, per-label table, schedule, box plots, training curves and the case panel
    for text in ("nnU-Net 2D", "Diffusion segmentation 2D", "label 1", "Training schedule", "Training curves",
                 "Worst, median and best case"):
        assert text in html
    loaded, total = loaded_images(out / "report.html")
    assert total >= 4 and loaded == total
    # the check can fail: a page with one damaged image counts one image fewer
    damaged = tmp_path / "damaged.html"
    damaged.write_text(html.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAAA", 1))
    assert loaded_images(damaged) == (total - 1, total)
    # never silently replaced
    assert main(["report", "-i", str(bench), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason=NO_CHROMIUM)
def test_report_of_an_evaluation_folder_shows_the_cases_with_uncertainty(quick_demo, tmp_path):
    from spinediff.evaluation.report import loaded_images

    summary = json.loads((quick_demo / "demo_summary.json").read_text())
    predictions = summary["predictions"]["segmentation"]["folder"]
    labels = next(quick_demo.rglob("Dataset901_SpinePhantomSeg/labelsTr"))
    evaluation = tmp_path / "evaluation"
    evaluation.mkdir()
    assert main(["evaluate", "-ref", str(labels), "-pred", predictions, "-o", str(evaluation)]) == 0
    assert main(["report", "-i", str(evaluation)]) == 0
    html = (evaluation / "report" / "report.html").read_text()
    assert "mean over labels" in html and "uncertainty" in html
    loaded, total = loaded_images(evaluation / "report" / "report.html")
    assert total >= 2 and loaded == total


def test_report_names_a_folder_that_is_no_benchmark_or_evaluation(tmp_path, capsys):
    assert main(["report", "-i", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "benchmark.json" in err and "Traceback" not in err
    assert not (tmp_path / "report").exists()


def test_eta_is_not_scaled_by_the_fast_io_stages_and_the_budget_caps_a_training():
    """The issue's failure: fast first (I/O) stages made the ETA scale every later stage by 0.5x. Here they leave
    the rest at its own expected cost; a slow compute stage scales the rest, but a training stage never beyond its
    trainings' budget."""
    from spinediff.experiments.demo import EXPECTED_STAGE_SECONDS, remaining_seconds

    expected = EXPECTED_STAGE_SECONDS["full"]
    names = list(expected)
    io_done = {name: expected[name] * 0.1 for name in names[:3]}  # phantom, register, validate: 10x faster
    assert remaining_seconds(expected, io_done) == pytest.approx(sum(expected[n] for n in names[3:]))
    slow = dict(io_done, **{"plan + preprocess": expected["plan + preprocess"] * 3})
    uncapped = remaining_seconds(expected, slow)
    assert uncapped == pytest.approx(3 * sum(expected[n] for n in names[4:]))
    capped = remaining_seconds(expected, slow, budget_minutes=1.0)
    assert capped < uncapped
    assert capped <= 2 * 60 + 3 * 60 + 0.15 * (expected[names[4]] + expected[names[5]]) + 3 * sum(
        expected[n] for n in names[6:]) + 1e-6


def test_quick_demo_records_how_far_each_eta_was_from_the_time_actually_left(quick_demo):
    summary = json.loads((quick_demo / "demo_summary.json").read_text())
    accuracy = summary["eta_accuracy"]
    stages = list(summary["stages_seconds"])
    assert list(accuracy) == stages[:-1] or list(accuracy) == stages
    for name, row in accuracy.items():
        actual = sum(summary["stages_seconds"][later] for later in stages[stages.index(name) + 1:])
        assert row["actual_seconds"] == pytest.approx(actual)
