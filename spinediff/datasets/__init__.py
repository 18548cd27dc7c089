"""Datasets: the synthetic spine phantom, dataset.json handling and validation."""
