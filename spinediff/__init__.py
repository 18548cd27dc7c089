"""spinediff: self-configuring diffusion models for spine imaging."""
__version__ = "0.1.0"
