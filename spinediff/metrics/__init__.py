"""Metrics every stage may use (training validation, evaluation, model selection): image and segmentation
scores. The bottom layer: imports nothing of spinediff above io/errors."""
