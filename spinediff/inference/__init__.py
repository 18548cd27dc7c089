"""Prediction from raw files, ensembles, uncertainty maps, best configuration."""
