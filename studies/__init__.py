"""Studies: one-off experiments behind the numbers in documentation/results.md (dataset-specific or tied to one
question), apart from the product (spinediff/) and the reusable benchmark suite (benchmarks/). Run each from the
repository root as a module, e.g. ``python -m studies.generation501 --help``."""
