"""The package version (one place; ``spinediff.__version__`` and ``spinediff --version`` read it)."""

__version__ = "0.1.0"
