"""``spinediff predict``: raw cases → predictions in the input geometry, with fold and sample ensembles."""

from __future__ import annotations

import argparse

from spinediff.diffusion.solvers import solver_names
from spinediff.inference.api import predict
from spinediff.paths import DEFAULT_PLANS
from spinediff.prediction.sampling import SamplingRequest
from spinediff.utilities.argtypes import existing_folder, fraction, non_negative_int, positive_int
from spinediff.utilities.device import add_device_argument, add_precision_argument


def run_predict(args: argparse.Namespace) -> int:
    sampling = SamplingRequest(num_samples=args.samples, num_inference_steps=args.num_inference_steps, eta=args.eta,
                               solver=args.solver, warm_start=args.warm_start, precision=args.precision, tta=args.tta,
                               tuned_sampling=not args.plans_sampling)
    report = predict(args.input, args.output, args.dataset, args.configuration, args.trainer, folds=args.folds,
                     plans_identifier=args.plans, checkpoint=args.checkpoint, device=args.device, sampling=sampling,
                     seed=args.seed, save_uncertainty=args.save_uncertainty,
                     save_probabilities=args.save_probabilities, overwrite=args.overwrite,
                     results_folder=args.results, postprocessing=not args.no_postprocessing,
                     num_parts=args.num_parts, part_id=args.part_id, init_from=args.init_from,
                     init_model=args.init_model, init_noise=args.init_noise, combine=args.combine)
    done = len(report.cases) - len(report.failed)
    seconds = [c.seconds for c in report.cases if c.ok and c.seconds is not None]
    timing = f", {sum(seconds) / len(seconds):.1f} s per case" if seconds else ""
    print(f"predicted {done} of {len(report.cases)} case(s) into {report.output_folder}{timing} "
          f"(summary: {report.summary_file.name})")
    for case in report.failed:
        print(f"  FAILED {case.identifier}: {case.message}")
    if report.review_table is not None:
        shown = ", ".join(report.flagged) if report.flagged else "none"
        drawn = f"; the flagged ones drawn in {report.review_sheet}" if report.review_sheet else ""
        print(f"review: {len(report.flagged)} case(s) above the model's review threshold, most doubtful first: "
              f"{shown} (all cases ranked in {report.review_table}{drawn})")
    return report.exit_code


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="predict raw images with trained folds (fold and sample ensembles, uncertainty maps)",
        description=(
            "Read raw cases (nnU-Net naming: CASE_XXXX.nii.gz per channel; a translation model reads only its "
            "source channels, a generation model one label map CASE.nii.gz), run nnU-Net's preprocessing from the "
            "plans, draw --samples DDIM samples with every fold, average them (class probabilities for "
            "segmentation, HU for translation/generation) and write the result with the input's exact geometry. "
            "A segmentation model with a review rule (review.json, written by its cross-validation) flags the "
            "cases a person should check in review.csv and draws them in review.png. "
            "A bad case is reported and skipped; the exit status is 2 if any case failed. Checkpoints are loaded "
            "with torch.load(weights_only=True): they cannot run code."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-i", "--input", required=True, type=existing_folder, help="folder of raw input images")
    parser.add_argument("-o", "--output", required=True, help="output folder (created)")
    parser.add_argument("-d", "--dataset", required=True, help="dataset ID or DatasetXXX_Name")
    parser.add_argument("-c", "--configuration", required=True, help="plans configuration, e.g. 2d_diffusion")
    parser.add_argument("-tr", "--trainer", default="DiffusionTranslationTrainer", help="trainer class name")
    parser.add_argument("-p", "--plans", default=DEFAULT_PLANS, help="plans identifier")
    parser.add_argument("-f", "--folds", nargs="+", default=None,
                        help="folds to ensemble (or 'all'); default: every fold of the model that has the checkpoint")
    parser.add_argument("--checkpoint", choices=["final", "best", "distilled"], default="final",
                        help="which checkpoint to load; distilled: the 1- or 2-step student of `spinediff distill`, "
                             "sampled at its own step count")
    parser.add_argument("--samples", type=positive_int, help="samples per fold K (default: the plans' num_samples)")
    parser.add_argument("--steps", dest="num_inference_steps", type=positive_int,
                        help="DDIM steps (default: the plans' num_inference_steps)")
    parser.add_argument("--eta", type=fraction, help="DDIM eta in [0, 1] (default: the plans', usually 0)")
    parser.add_argument("--solver", "--sampler", dest="solver", choices=solver_names(),
                        help="the step rule of sampling (spinediff.diffusion.solvers; --sampler is its old name): "
                             "ddim, the multistep dpm++2m (DPM-Solver++ 2M) or unipc (UniPC), the stochastic ddpm "
                             "(ancestral); euler for rectified-flow models (default: the plans' solver)")
    parser.add_argument("--warm-start", type=fraction, metavar="F",
                        help="start sampling at timestep F x T from the network's one-call estimate instead of pure "
                             "noise (SpineSegDiff's warm start): 1 + --steps network calls per sample; 0 turns a "
                             "planned warm start off (default: the plans' warm_start, usually none)")
    parser.add_argument("--plans-sampling", action="store_true",
                        help="sample as the plans say even when the model folder has a sampling.json (the solver, "
                             "steps and warm start chosen on the cross-validation by `spinediff tune_sampling`, used "
                             "by default when none of --solver, --steps and --warm-start is given)")
    refine = parser.add_argument_group("refinement of another model's answer (SpineSegDiff's presegmentation start)")
    refine.add_argument("--init-from", metavar="FOLDER", type=existing_folder,
                        help="start every fold from these predictions instead of pure noise: CASE.npz class "
                             "probabilities (nnUNetv2_predict --save_probabilities, spinediff predict "
                             "--save-probabilities) or CASE label maps / target images, used as they are (to start "
                             "from an nnU-Net answer after its level numbering, as --init-model does, write it with "
                             "spinediff postprocess --save-probabilities)")
    refine.add_argument("--init-model", metavar="TRAINER__PLANS__CONFIG",
                        help="predict this model of the same dataset first, fold by fold (fold f starts from its fold "
                             "f), after that model's post-processing where its postprocessing.json keeps one, then "
                             "refine; default for a DiffusionRefinementTrainer model: its refinement.json")
    refine.add_argument("--init-noise", type=float, metavar="F",
                        help="noise the initial answer to F x T before denoising (0: the answer itself; default: the "
                             "model's tuned sampling.json, its refinement.json, the plans' warm_start, else 0.3)")
    refine.add_argument("--combine", choices=["mean", "spinesegdiff"], default="mean",
                        help="mean: average the samples' class probabilities; spinesegdiff: SpineSegDiff's weighting "
                             "of the last steps and the maximum entropy over them as the uncertainty map")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="base seed; the same seed gives the same output")
    tta = parser.add_mutually_exclusive_group()
    tta.add_argument("--disable-tta", dest="tta", action="store_false", default=None,
                     help="no mirroring test-time augmentation (default on a GPU: mirroring costs 2^axes network calls "
                          "per step)")
    tta.add_argument("--enable-tta", dest="tta", action="store_true", help="mirroring TTA, also on the CPU")
    parser.add_argument("--save-uncertainty", action="store_true",
                        help="write CASE_uncertainty (segmentation: sample-disagreement entropy; images: std across "
                             "samples in HU), CASE_variance (segmentation) and CASE_uncertainty.json")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="segmentation: write the mean class probabilities as CASE.npz for `spinediff ensemble`")
    parser.add_argument("--no-postprocessing", action="store_true",
                        help="segmentation: do not apply the model's postprocessing.json (the level numbering that "
                             "`spinediff find_best` keeps when it improves the cross-validation Dice)")
    add_device_argument(parser, "where to sample")
    add_precision_argument(parser)
    parser.add_argument("--num-parts", type=positive_int, default=1,
                        help="split the input cases into this many parts, one per process or GPU (nnU-Net's "
                             "-num_parts); each run predicts one part into the same output folder")
    parser.add_argument("--part-id", type=non_negative_int, default=0,
                        help="which part this run predicts, 0..NUM_PARTS-1 (e.g. CUDA_VISIBLE_DEVICES=1 spinediff "
                             "predict ... --num-parts 2 --part-id 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--results", help="nnU-Net results folder (default: $nnUNet_results)")
    parser.set_defaults(func=run_predict)
