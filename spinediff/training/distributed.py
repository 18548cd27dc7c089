"""Distributed data-parallel training (PyTorch DDP) under ``torchrun``, on CPU (gloo) and GPU (NCCL).

``torchrun`` starts one process per device and tells each, through the environment, who it is
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and where to meet (``MASTER_ADDR``/``MASTER_PORT``).
:func:`process_group` joins them (``env://``); :class:`DistributedTrainerMixin` makes an nnU-Net
trainer data-parallel. nnunetv2 has a DDP path of its own (``-num_gpus``, ``mp.spawn``), but it
assumes CUDA and one machine, so spinediff does not use it:

- nnU-Net's constructor sets the device to ``cuda:RANK`` as soon as a process group exists; the
  mixin uses ``cpu`` for gloo and ``cuda:LOCAL_RANK`` for NCCL (``RANK`` is global: on the second
  machine of a multi-node job it is larger than the number of local GPUs).
- nnU-Net wraps the network in ``DDP(device_ids=[RANK])``, which CPU modules reject; the mixin
  lets nnU-Net build the plain network and wraps it itself. The global batch of the plans is still
  split across ranks by nnU-Net's own ``_set_batch_size_and_oversample``.
- Each rank seeds numpy, ``random`` and torch differently, so its data loader draws other samples
  and augmentations than its peers (nnU-Net's loader draws from these global generators; without
  seeding, every rank starts torch from the same default seed).
- nnU-Net gathers the training loss across ranks; the mixin adds :meth:`gather_across_ranks` for
  the validation outputs, a check that all ranks start from the same epoch (a resumed run whose
  checkpoint only one machine can see would otherwise hang), and, at the end, the largest
  difference of any parameter to rank 0 in the log (0 when DDP did its job).

Only global rank 0 writes checkpoints, logs, the progress plot and validation outputs (nnU-Net's
``self.local_rank`` is the *global* rank, which is what a single writer needs).
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from spinediff.errors import SpineDiffError

#: What torchrun sets for every process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class LaunchEnvironment:
    """Who this process is in a torchrun job, read from the environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @classmethod
    def read(cls, environ: dict[str, str] | None = None) -> LaunchEnvironment | None:
        """The torchrun environment, or ``None`` if any of its variables is missing."""
        environ = dict(os.environ if environ is None else environ)
        if any(name not in environ for name in TORCHRUN_VARIABLES):
            return None
        try:
            return cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"]),
                       environ["MASTER_ADDR"], int(environ["MASTER_PORT"]))
        except ValueError:
            raise SpineDiffError("RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers (torchrun sets them); "
                                 f"got {', '.join(f'{k}={environ[k]!r}' for k in TORCHRUN_VARIABLES)}.") from None


def backend_for(device: torch.device) -> str:
    """NCCL for GPUs, gloo for CPUs (NCCL has no CPU tensors)."""
    return "nccl" if device.type == "cuda" else "gloo"


def start_process_group(device: str | torch.device) -> torch.device:
    """Join the torchrun job (``env://``) and return this rank's device (``cpu`` or ``cuda:LOCAL_RANK``)."""
    environment = LaunchEnvironment.read()
    if environment is None:
        missing = ", ".join(name for name in TORCHRUN_VARIABLES if name not in os.environ)
        raise SpineDiffError(f"Distributed training needs the environment torchrun sets; missing: {missing}. "
                             "Launch with `torchrun --nproc-per-node N -m spinediff.run.train ...`.")
    requested = torch.device(device)
    if requested.type == "cuda":
        if not torch.cuda.is_available():
            raise SpineDiffError("--device cuda, but torch sees no GPU here. Use --device cpu (gloo) or a CUDA build "
                                 "of torch.")
        if environment.local_rank >= torch.cuda.device_count():
            raise SpineDiffError(f"LOCAL_RANK {environment.local_rank} has no GPU: {torch.cuda.device_count()} are "
                                 "visible. Start at most one process per GPU (--nproc-per-node).")
        rank_device_ = torch.device("cuda", environment.local_rank)
        torch.cuda.set_device(rank_device_)  # NCCL collectives and all_gather_object use the current device
    elif requested.type == "cpu":
        rank_device_ = torch.device("cpu")
    else:
        raise SpineDiffError(f"Distributed training runs on cpu (gloo) or cuda (NCCL), not {requested.type}.")
    if not dist.is_initialized():
        dist.init_process_group(backend_for(rank_device_), init_method="env://")
    return rank_device_


def stop_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device: str | torch.device) -> Iterator[torch.device]:
    """``with process_group("cpu") as device:`` — joined inside, torn down on leaving (also on errors).

    A group that already exists (joined by the caller) is used and left to the caller. There is no
    barrier on leaving: rank 0 alone runs the final validation, which may take longer than a
    collective's timeout; the other ranks simply finish (torchrun waits for all of them).
    """
    created = not is_distributed()
    device_ = start_process_group(device)
    try:
        yield device_
    finally:
        if created:
            stop_process_group()


# ---------------------------------------------------------------------- queries and collectives
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """The rank on this machine (torchrun's ``LOCAL_RANK``; the global rank if something else launched us)."""
    return int(os.environ.get("LOCAL_RANK", rank()))


def rank_device(requested: torch.device) -> torch.device:
    """This rank's device: ``cpu`` for a CPU request, ``cuda:LOCAL_RANK`` for any CUDA request."""
    return torch.device("cuda", local_rank()) if requested.type == "cuda" else torch.device("cpu")


def seed_for_rank(base: int, epoch: int = 0) -> int:
    """A reproducible 32-bit seed that differs between ranks (and between runs resumed at other epochs)."""
    return int(np.random.SeedSequence([int(base) % 2**63, rank(), int(epoch)]).generate_state(1)[0])


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_lists(items: list) -> list:
    """Concatenation of every rank's ``items`` in rank order (``items`` itself in a single process)."""
    if not is_distributed():
        return items
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any: decisions that end a loop must be shared, or the
    ranks that go on wait forever for the ones that stopped."""
    if not is_distributed():
        return bool(flag)
    value = torch.tensor([int(bool(flag))], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_parameters(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (for modules that DDP does not wrap)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def average_gradients(module: nn.Module) -> None:
    """Average the gradients of a module that DDP does not wrap (what DDP does for the network)."""
    if not is_distributed():
        return
    for parameter in module.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
            parameter.grad.div_(world_size())


def max_parameter_difference(modules: Iterable[nn.Module]) -> float:
    """Largest absolute difference, over all ranks, between a floating parameter/buffer and rank 0's copy."""
    if not is_distributed():
        return 0.0
    device = _collective_device()
    local = [t.detach().reshape(-1).float().to(device) for m in modules for t in m.state_dict().values()
             if t.is_floating_point()]
    if not local:
        return 0.0
    flat = torch.cat(local)
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    difference = (flat - reference).abs().max().reshape(1)
    dist.all_reduce(difference, op=dist.ReduceOp.MAX)
    return float(difference.item())


def wrap_network(network: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP around ``network``: ``device_ids`` for one GPU per process, none on CPU (DDP rejects them there).

    On GPUs BatchNorm layers become SyncBatchNorm, as in nnU-Net; gloo has no SyncBatchNorm and our
    networks use GroupNorm/InstanceNorm, whose statistics are per sample anyway.

    ``find_unused_parameters``: the U-Nets keep the deep-supervision output heads of the lower decoder
    stages even when deep supervision is off, so some parameters never get a gradient; DDP would
    otherwise wait for them and fail at the second step.
    """
    if device.type == "cuda":
        network = nn.SyncBatchNorm.convert_sync_batchnorm(network)  # keeps the same Parameter objects
        return DistributedDataParallel(network, device_ids=[device.index], output_device=device.index,
                                       find_unused_parameters=True)
    return DistributedDataParallel(network, find_unused_parameters=True)


def seed_global_generators(seed: int) -> None:
    """numpy, ``random`` and torch: what nnU-Net's data loader and augmentations draw from."""
    np.random.seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------- the trainer side
class DistributedTrainerMixin:
    """DDP for an ``nnUNetTrainer`` subclass on CPU and GPU; list it before ``nnUNetTrainer`` in the bases.

    In a single process (no process group) every method does what nnU-Net does.
    """

    #: Base of the per-rank seeds of the data loaders (combined with the rank and the start epoch).
    data_seed: int = 12345

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's default, never mutated)
        # nnU-Net records the constructor's arguments by name: keep its exact signature.
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp:
            self.device = rank_device(device)
            if self.device.type != "cuda":
                self.grad_scaler = None  # nnU-Net made a CUDA GradScaler for the cuda device it assumed
            self.print_to_log_file(f"Distributed training: {world_size()} ranks ({dist.get_backend()}), this is "
                                   f"rank {rank()} on {self.device}.")

    def initialize(self) -> None:
        if not self.is_ddp:
            super().initialize()
            return
        global_batch = self.configuration_manager.batch_size
        if global_batch < world_size():
            raise SpineDiffError(f"The plans' batch size {global_batch} is the global batch, split across ranks; "
                                 f"it cannot feed {world_size()} processes. Start at most {global_batch} processes "
                                 "or raise batch_size in the plans.")
        # nnU-Net would wrap with device_ids=[RANK] (rejected for CPU modules, wrong GPU on later nodes): let it
        # build the plain network and optimiser, then split the batch its way and wrap here.
        self.is_ddp = False
        try:
            super().initialize()
        finally:
            self.is_ddp = True
        self._set_batch_size_and_oversample()
        self.network = wrap_network(self.network, self.device)

    def on_train_start(self) -> None:
        if self.is_ddp:
            if not self.was_initialized:
                self.initialize()
            epochs = gather_lists([self.current_epoch])
            if len(set(epochs)) > 1:
                raise SpineDiffError(
                    f"The ranks would start from different epochs {epochs}: not every process found the same "
                    f"checkpoint in {self.output_folder}. With several machines, nnUNet_results must be a folder all "
                    "of them share.")
            seed_global_generators(seed_for_rank(self.data_seed, self.current_epoch))
        super().on_train_start()

    def on_train_end(self) -> None:
        if self.is_ddp:
            difference = max_parameter_difference(self.replicated_modules())
            self.print_to_log_file(f"Parameters on the {world_size()} ranks: largest difference to rank 0 = "
                                   f"{difference:.3g}")
        super().on_train_end()

    # ------------------------------------------------------------------ hooks for trainers
    def rank_seed(self, base: int) -> int:
        """``base`` in a single process; a different reproducible seed on each rank under DDP."""
        return seed_for_rank(base, self.current_epoch) if self.is_ddp else base

    def restore_generator(self, generator: torch.Generator, state: torch.Tensor) -> None:
        """Restore a checkpointed generator; under DDP each rank branches off it with its own seed (the
        checkpoint, written by rank 0, holds rank 0's stream only)."""
        generator.set_state(state)
        if self.is_ddp:
            base = int(torch.randint(0, 2**62, (1,), generator=generator))
            generator.manual_seed(seed_for_rank(base, self.current_epoch))

    def gather_across_ranks(self, outputs: list) -> list:
        """Every rank's step outputs, so that metrics are computed over the global batch (and agree)."""
        return gather_lists(outputs) if self.is_ddp else outputs

    def replicated_modules(self) -> list[nn.Module]:
        """Modules that must be identical on all ranks: every module the trainer holds (the network,
        a discriminator, ...) and the module inside any weight average (EMA)."""
        modules = []
        for value in vars(self).values():
            if isinstance(value, nn.Module):
                modules.append(value)
            elif isinstance(getattr(value, "module", None), nn.Module):
                modules.append(value.module)
        return modules


# ---------------------------------------------------------------------------------------- joining a torchrun job
#: The module torchrun starts (``torchrun --nproc-per-node N -m spinediff.run.train ARGS``).
TORCHRUN_MODULE = "spinediff.run.train"


def torchrun_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The command-line arguments of ``parser`` that reproduce ``args`` (defaults and ``--distributed`` left
    out)."""
    tokens: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "distributed"):
            continue
        value = getattr(args, action.dest, action.default)
        if value is None or value == action.default:
            continue
        option = max(action.option_strings, key=len)
        tokens += [option] if action.nargs == 0 else [option, str(value)]  # nargs 0: a store_true flag
    return tokens


def launch_command(args: argparse.Namespace, parser: argparse.ArgumentParser, processes: str) -> str:
    return (f"torchrun --nproc-per-node {processes} -m {TORCHRUN_MODULE} "
            f"{shlex.join(torchrun_arguments(args, parser))}")


@contextmanager
def distributed_session(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Iterator[None]:
    """Join the torchrun job for the duration of one ``spinediff train`` (``args``, parsed by ``parser``), or
    explain how to launch one."""
    if LaunchEnvironment.read() is None:
        missing = ", ".join(name for name in TORCHRUN_VARIABLES if name not in os.environ)
        processes = "NUM_GPUS" if torch.device(args.device).type == "cuda" else "2"
        raise SpineDiffError(
            f"Distributed training (--distributed, {TORCHRUN_MODULE}) runs in processes started by torchrun; "
            f"torchrun's environment variables are missing ({missing}). Launch it with:\n"
            f"  {launch_command(args, parser, processes)}\n"
            "(one process per GPU with --device cuda; on CPU each process trains on its share of the cores). "
            "Several machines: add --nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id JOB on "
            "every machine; see documentation/distributed.md.")
    with process_group(args.device):
        yield
