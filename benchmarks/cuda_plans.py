"""What the planner gives a GPU of 8, 24, 40 and 80 GB: the ``2d_diffusion`` / ``3d_diffusion`` plans next to
nnU-Net's own ``2d`` / ``3d_fullres``, with the memory model's estimate (nnU-Net's reference units, which assume
mixed precision: the spinediff trainers now train with bfloat16/float16 autocast on CUDA, as nnU-Net does).

Usage::

    python benchmarks/cuda_plans.py            # Dataset501 from ../shared/data, else the phantom

Plans only (no preprocessing, no GPU needed); writes ``benchmarks/output/performance/cuda_plans.{json,md}``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import perf_common as pc

MEMORY_GB = (8, 24, 40, 80)
DATA = pc.ROOT.parent / "shared" / "data" / "Dataset501_LumbarVB3dev"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    from spinediff.io import read_json
    from spinediff.planning.api import plan_dataset, summarize_plans

    work = Path(tempfile.mkdtemp(prefix="spinediff_cuda_plans_"))
    raw = work / "raw"
    raw.mkdir()
    if DATA.is_dir():
        (raw / DATA.name).symlink_to(DATA)
        dataset, name = 501, DATA.name
    else:
        from spinediff.datasets.phantom_writer import write_phantom_datasets

        write_phantom_datasets(raw, num_cases=6, seed=pc.PHANTOM_SEED, tasks=("segmentation",), progress=False)
        dataset, name = 901, "Dataset901_SpinePhantomSeg"
    rows, records = [], []
    try:
        for gigabytes in MEMORY_GB:
            plans_file = plan_dataset(dataset, device="cuda", memory_target_gb=gigabytes, preprocess=False,
                                      num_processes=1, raw_folder=raw, preprocessed_folder=work / f"pre{gigabytes}",
                                      overwrite=True, show_progress_bar=False)
            for row in summarize_plans(read_json(plans_file), ["2d", "3d_fullres", "2d_diffusion", "3d_diffusion"]):
                records.append({"memory_gb": gigabytes, **row})
                rows.append([gigabytes, row["configuration"], row["network"],
                             "x".join(f"{s:g}" for s in row["spacing"]), "x".join(map(str, row["patch_size"])),
                             row["batch_size"], row["features"], row["estimated_gpu_gb"]])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    header = ["GPU GB", "configuration", "network", "spacing mm", "patch", "batch", "features", "estimated GB"]
    markdown = f"Plans of {name} for CUDA GPUs (`spinediff plan --device cuda --memory-target-gb N`):\n\n"
    pc.write_result("cuda_plans", {"dataset": name, "records": records}, markdown + pc.markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    pc.run_main(main)
