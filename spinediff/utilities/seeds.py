"""The one fold-seed formula: what a fold of a cross-validation draws from, in training and in prediction.

Training seeds its generators (network initialisation, data loading, diffusion noise) and prediction its sampling
noise with ``fold_seed(seed, fold)``, so a fold is reproducible on its own and folds draw different noise. Fold 0
and ``all`` use the seed itself. ``tests/test_architecture.py`` fails on a second formula (a product with a fold).
"""

from __future__ import annotations

#: fold f draws from seed + f x stride (a prime, so fold seeds and the +z / +i offsets of slices and
#: ensemble members do not collide for any realistic seed)
FOLD_SEED_STRIDE = 1_000_003


def fold_seed(seed: int, fold: int | str) -> int:
    """The seed fold ``fold`` (a number, or ``all``) uses for base seed ``seed``."""
    return int(seed) + FOLD_SEED_STRIDE * (int(fold) if str(fold).isdigit() else 0)
