"""Orchestration above training and inference: the benchmark harness (train every method on the folds, score,
compare), the downstream Dice of synthetic images, and ``spinediff demo``. Nothing below imports from here."""
