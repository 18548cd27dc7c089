"""--device: parsed once by argparse, the same meaning in every command."""

import pytest
import torch

from spinediff.cli import build_parser
from spinediff.errors import SpineDiffError
from spinediff.utilities.device import parse_device


def test_auto_means_a_gpu_when_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parse_device("auto") == torch.device("cuda")
    assert parse_device("cuda:1") == torch.device("cuda", 1) and parse_device(" CPU ") == torch.device("cpu")


def test_a_wrong_device_is_named_with_the_choices():
    with pytest.raises(SpineDiffError, match=r"--device must be auto .*cuda:N; got 'gpu'"):
        parse_device("gpu")


@pytest.mark.parametrize("command", [["plan", "-d", "1"], ["train", "-d", "1", "-c", "2d_diffusion", "-f", "0"],
                                     ["predict", "-i", ".", "-o", "y", "-d", "1", "-c", "2d_diffusion"],
                                     ["find_best", "-d", "1"], ["benchmark", "-d", "1"], ["demo"]])
def test_every_command_gets_a_torch_device_defaulting_to_auto(command, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parser = build_parser()
    assert parser.parse_args(command).device == torch.device("cpu")
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--device", "tpu"])
    assert "--device must be" in capsys.readouterr().err
    if command[0] == "plan":  # plans for a GPU can be made on a machine without one
        assert parser.parse_args([*command, "--device", "cuda:0"]).device == torch.device("cuda", 0)
        return
    with pytest.raises(SystemExit):  # the others run on the device: refused while parsing, before any work
        parser.parse_args([*command, "--device", "cuda:0"])
    assert "no CUDA device is visible to torch" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parser.parse_args([*command, "--device", "cuda:1"]).device == torch.device("cuda", 1)
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--device", "cuda:2"])
    assert "torch sees 2 CUDA device(s)" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["train", "-d", "1", "-c", "2d_diffusion", "-f", "0"],
                                     ["predict", "-i", ".", "-o", "y", "-d", "1", "-c", "2d_diffusion"],
                                     ["benchmark", "-d", "1"]])
def test_precision_is_one_flag_with_the_same_values(command, capsys):
    parser = build_parser()
    assert parser.parse_args(command).precision == "auto"
    assert parser.parse_args([*command, "--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--precision", "half"])


@pytest.mark.parametrize(("flag", "seed"), [([], 0), (["--seed", "7"], 7), (["--seed", "-1"], None)])
def test_benchmark_passes_its_seed_to_every_fold(flag, seed, monkeypatch):
    """``spinediff benchmark --seed`` reaches the training options of every fold (-1: unseeded)."""
    import spinediff.experiments.benchmark_command as command

    seen = {}

    def fake_benchmark(dataset, **kwargs):
        seen["options"] = kwargs["options"]
        return {"table": "", "output": "out"}

    monkeypatch.setattr(command, "run_benchmark", fake_benchmark)
    assert command.run(build_parser().parse_args(["benchmark", "-d", "1", "--device", "cpu", *flag])) == 0
    assert seen["options"].seed == seed
