"""Helpers every stage needs, below training and inference: writing predictions in the raw geometry
(``export``)."""
