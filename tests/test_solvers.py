"""The solver interface and registry (spinediff.diffusion.solvers): every solver samples exactly as before the
registry existed, a solver is found by name, the flow/solver rule comes from the registry, and a new solver is one
class in one file.

``tests/data/solver_reference.json`` holds the samples of the cases below as computed by the string-branch sampler
before the registry (commit 7f42d7e); ``python tests/test_solvers.py`` rewrites it (only do that on purpose).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from spinediff.diffusion import DiffusionProcess, SlidingWindowSampler, VolumePredictor
from spinediff.networks import TimeConditionedUNet

REFERENCE = Path(__file__).parent / "data" / "solver_reference.json"

#: name -> (solver, process keyword arguments, sampler keyword arguments, steps, warm start)
CASES = {
    "ddim_x0": ("ddim", {}, {}, 3, None),
    "ddim_x0_uneven_steps": ("ddim", {}, {}, 7, None),
    "ddim_eps_eta": ("ddim", {"prediction_type": "epsilon"}, {"eta": 0.5}, 4, None),
    "ddim_no_clip": ("ddim", {"prediction_type": "v_prediction"}, {"clip_sample": False}, 3, None),
    "ddim_segmentation": ("ddim", {"loss": "dice_ce"}, {}, 3, None),
    "dpm_x0": ("dpm++2m", {}, {}, 4, None),
    "dpm_segmentation": ("dpm++2m", {"loss": "dice_ce"}, {}, 3, None),
    "unipc_v": ("unipc", {"prediction_type": "v_prediction"}, {}, 4, None),
    "euler_x0": ("euler", {"noise_schedule": "rflow"}, {}, 3, None),
    "euler_v_segmentation": ("euler", {"noise_schedule": "rflow", "prediction_type": "v_prediction",
                                       "loss": "dice_ce"}, {}, 3, None),
    "ddim_warm": ("ddim", {}, {}, 2, 0.3),
    "dpm_warm": ("dpm++2m", {}, {}, 2, 0.3),
}


def tiny_network(target_channels: int) -> nn.Module:
    torch.manual_seed(0)
    network = TimeConditionedUNet(1 + target_channels, 2, [8, 16], nn.Conv2d, [[3, 3], [3, 3]], [[1, 1], [2, 2]], 1,
                                  target_channels, 1, conv_bias=True, time_embedding_dim=8)
    network.apply(network.initialize)
    return network.eval()


def draw(name: str) -> torch.Tensor:
    """Two samples of a 12 x 10 condition with 8 x 8 windows (sliding, blended) for one case of :data:`CASES`."""
    solver, process_options, sampler_options, steps, warm = CASES[name]
    segmentation = process_options.get("loss") == "dice_ce"
    process = DiffusionProcess(**process_options)
    network = tiny_network(3 if segmentation else 1)
    condition = torch.linspace(-1, 1, 120).reshape(1, 12, 10)
    torch.set_num_threads(1)
    if warm is not None:
        predictor = VolumePredictor(network, process=process, patch_size=(8, 8), window_batch_size=3,
                                    solver=solver, warm_start=warm, sample_batch_size=2)
        return predictor.predict(condition, num_inference_steps=steps, num_samples=2, seed=5)
    sampler = SlidingWindowSampler(network, process, (8, 8), window_batch_size=3, sample_batch_size=2,
                                   solver=solver, **sampler_options)
    return sampler.sample(condition, 2, generator=5, num_inference_steps=steps)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_solver_samples_as_before_the_registry(name: str) -> None:
    """Each solver's samples equal those the string-branch loop drew (float32 round-off allowed for other CPUs;
    on the machine that wrote the reference they are bit-identical)."""
    reference = torch.tensor(json.loads(REFERENCE.read_text())[name])
    sample = draw(name)
    assert sample.shape == reference.shape
    assert torch.allclose(sample, reference, rtol=0, atol=1e-5), (name, (sample - reference).abs().max())



# --------------------------------------------------------------------------- the registry
def test_solvers_are_found_by_name_and_the_flow_rule_comes_from_the_registry() -> None:
    from spinediff.diffusion.settings import DiffusionSettings
    from spinediff.diffusion.solvers import check_solver, make_solver, solver_class, solver_names
    from spinediff.errors import SpineDiffError

    assert solver_names()[:4] == ("ddim", "dpm++2m", "unipc", "euler") and "ddpm" in solver_names()
    assert solver_names(rectified_flow=True) == ("euler",)
    assert solver_class("ddpm").__module__ == "spinediff.diffusion.solvers.ddpm"  # imported by nobody: found
    assert make_solver("unipc", DiffusionProcess()).name == "unipc"
    with pytest.raises(SpineDiffError, match="solver must be one of ddim, dpm\\+\\+2m, unipc, euler, ddpm"):
        solver_class("heun")
    with pytest.raises(SpineDiffError, match="samples with euler"):
        make_solver("ddpm", DiffusionProcess(noise_schedule="rflow"))
    with pytest.raises(SpineDiffError, match="takes 1 to 999 steps"):  # diffusers' multistep spacing
        check_solver("dpm++2m", "cosine", 1000, 1000)
    assert check_solver("ddim", "cosine", 1000, 1000).name == "ddim"
    planned = DiffusionSettings(task="translation", condition_channels=1, target_channels=1, solver="ddpm")
    assert planned.solver == "ddpm"  # a registered solver is a valid plans value without touching settings.py


def test_the_ddpm_solver_is_stochastic_per_seed_and_lands_on_a_perfect_x0() -> None:
    """The solver added in one file (spinediff/diffusion/solvers/ddpm.py, documentation/extending.md): a network
    that always predicts the same x0 is sampled to exactly that x0 (the last step goes to the data, without noise)
    at any step count; with a real network the same seed repeats the sample and another seed changes it."""

    class Perfect(nn.Module):
        num_classes = 1

        def __init__(self) -> None:
            super().__init__()
            self.anchor = nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return torch.linspace(-0.8, 0.8, 64).reshape(1, 1, 8, 8).expand(x.shape[0], 1, 8, 8) + 0 * self.anchor

    target = torch.linspace(-0.8, 0.8, 64).reshape(1, 8, 8)
    for steps in (1, 3, 10):
        sample = SlidingWindowSampler(Perfect(), DiffusionProcess(), (8, 8), solver="ddpm").sample(
            torch.zeros((1, 8, 8)), 2, generator=0, num_inference_steps=steps)
        assert torch.allclose(sample, target.expand(2, 1, 8, 8), atol=1e-5), steps
    sampler = SlidingWindowSampler(tiny_network(1), DiffusionProcess(), (8, 8), solver="ddpm")
    condition = torch.linspace(-1, 1, 120).reshape(1, 12, 10)
    first, again, other = (sampler.sample(condition, 1, generator=g, num_inference_steps=4) for g in (1, 1, 2))
    ddim = SlidingWindowSampler(tiny_network(1), DiffusionProcess(), (8, 8)).sample(condition, 1, generator=1,
                                                                                   num_inference_steps=4)
    assert torch.equal(first, again) and not torch.allclose(first, other) and not torch.allclose(first, ddim)
    assert first.abs().max() <= 1 + 1e-6  # x0 clipped to the data range by the loop before each step


def test_the_sampling_loop_names_no_solver() -> None:
    """sampler.py and volume.py ask the solver object (clips_x0, needs_x0, timesteps), never compare names."""
    import ast

    import spinediff.diffusion.sampler as sampler_module
    import spinediff.diffusion.volume as volume_module
    from spinediff.diffusion.solvers import solver_names

    for module in (sampler_module, volume_module):
        tree = ast.parse(Path(module.__file__).read_text())
        named = [node.value for node in ast.walk(tree)
                 if isinstance(node, ast.Constant) and node.value in solver_names()]
        assert named == ["ddim"] * len(named) and len(named) <= 1, (module.__name__, named)  # the default only

if __name__ == "__main__":
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps({name: draw(name).tolist() for name in sorted(CASES)}))
    print(f"wrote {REFERENCE}")
