"""Graf et al.'s claims tested on our translation benchmark (issue 18): paired Wilcoxon signed-rank tests over the
validation cases between the methods each claim compares, read from ``spinediff benchmark``'s ``benchmark.json``.

    python -m studies.translation_claims benchmarks/output/translation_methods/benchmark.json \\
        [benchmarks/output/translation_methods/bench3d/benchmark.json] [--metric mae_body]

Claims: image mode (x0) beats noise mode (eps); x0 vs v-prediction; paired beats unpaired (the best paired method
against the best unpaired one: CUT, unpaired diffusion); diffusion (x0) against the perception-loss regression
baseline (nnsyn); 3D beats 2D (each method present in both). For each: the two means, the number of cases, which is
better, and the two-sided p-value. Writes ``translation_claims.{json,md}`` beside the first benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

LOWER_IS_BETTER = {"mae", "mae_body", "mae_bone", "frechet"}
UNPAIRED = ("CUT", "Unpaired diffusion")


def per_case(summary: dict, method: str, metric: str) -> dict[str, float]:
    return {case: float(scores[metric]) for case, scores in summary["per_case"][method].items()
            if metric in scores and math.isfinite(float(scores[metric]))}


def compare(a: dict[str, float], b: dict[str, float], metric: str) -> dict:
    cases = sorted(set(a) & set(b))
    x, y = np.array([a[c] for c in cases]), np.array([b[c] for c in cases])
    p = float("nan") if len(cases) < 2 else 1.0 if np.allclose(x, y) else float(stats.wilcoxon(x, y).pvalue)
    first_better = bool(x.mean() < y.mean()) if metric in LOWER_IS_BETTER else bool(x.mean() > y.mean())
    return {"n": len(cases), "mean_first": float(x.mean()), "mean_second": float(y.mean()), "p": p,
            "first_better": first_better}


def find(methods: list[str], prefix: str) -> str | None:
    return next((m for m in methods if m.startswith(prefix)), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmarks", nargs="+", type=Path, help="benchmark.json files (2D, and 3D if run apart)")
    parser.add_argument("--metric", default="mae_body", help="the per-case metric the tests compare")
    args = parser.parse_args(argv)
    summary: dict = {"per_case": {}, "methods": []}
    for path in args.benchmarks:
        data = json.loads(path.read_text())
        summary["per_case"].update(data["per_case"])
        summary["methods"] += data["methods"]
    methods = list(summary["per_case"])
    metric = args.metric
    pairs = []
    for dim in ("2D", "3D"):
        x0 = find(methods, f"Diffusion image mode (x0) {dim}")
        for label, other in (("image mode (x0) vs noise mode (eps)", f"Diffusion noise mode (eps) {dim}"),
                             ("image mode (x0) vs v-prediction", f"Diffusion v-prediction {dim}"),
                             ("diffusion (x0) vs masked regression + perception loss",
                              f"Masked regression + perception loss {dim}"),
                             ("diffusion (x0) vs regression U-Net", f"Regression U-Net {dim}")):
            second = find(methods, other)
            if x0 and second:
                pairs.append((f"{dim}: {label}", x0, second))
        means = {m: np.mean(list(per_case(summary, m, metric).values())) for m in methods if m.endswith(dim)}
        sign = 1 if metric in LOWER_IS_BETTER else -1
        paired = [m for m in means if not m.startswith(UNPAIRED)]
        unpaired = [m for m in means if m.startswith(UNPAIRED)]
        if paired and unpaired:
            pairs.append((f"{dim}: best paired vs best unpaired", min(paired, key=lambda m: sign * means[m]),
                          min(unpaired, key=lambda m: sign * means[m])))
    for method in methods:
        if method.endswith(" 3D") and method[:-3] + " 2D" in methods:
            pairs.append((f"3D vs 2D: {method[:-3]}", method, method[:-3] + " 2D"))
    rows = []
    for claim, first, second in pairs:
        result = compare(per_case(summary, first, metric), per_case(summary, second, metric), metric)
        rows.append({"claim": claim, "first": first, "second": second, **result})
    lines = [f"Command: `python -m studies.translation_claims {' '.join(str(p) for p in args.benchmarks)} "
             f"--metric {metric}`", "",
             f"Paired two-sided Wilcoxon signed-rank tests over the validation cases, on `{metric}` "
             f"({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better).", "",
             "| claim | first | second | n | first mean | second mean | better | p |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['claim']} | {r['first']} | {r['second']} | {r['n']} | {r['mean_first']:.3f} | "
                     f"{r['mean_second']:.3f} | {'first' if r['first_better'] else 'second'} | {r['p']:.3g} |")
    out = args.benchmarks[0].parent
    (out / "translation_claims.json").write_text(json.dumps({"metric": metric, "claims": rows}, indent=2))
    (out / "translation_claims.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
