"""Helpers every stage needs, below training and inference: writing predictions in the raw geometry
(``export``), the one comparison of image grids (``geometry``)."""
