"""The `spinediff` command: help, exit codes, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spinediff.cli import main


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("phantom", "validate"):
        assert command in out


def test_missing_nnunet_raw_variable_gives_a_clear_message(monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert main(["validate", "-d", "901"]) == 2
    err = capsys.readouterr().err
    assert "nnUNet_raw" in err and "Traceback" not in err


def test_validate_exit_codes(phantom_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(phantom_root))
    assert main(["validate", "-d", "902", "-q"]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["validate", "-d", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_phantom_command_end_to_end(tmp_path):
    """The real console entry point, as a user runs it."""
    cmd = [sys.executable, "-m", "spinediff.cli", "phantom", "-o", str(tmp_path), "--cases", "1", "--task",
           "segmentation", "--shape", "32", "48", "6", "--mr-spacing", "4.5", "4.5", "9", "--ct-spacing", "4", "4",
           "4", "--preview"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "Dataset901_SpinePhantomSeg"
    assert (folder / "preview.png").stat().st_size > 10_000
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
