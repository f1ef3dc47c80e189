"""nfpi: class-conditional normalizing flows with class Gaussians learned by fixed-point
iteration (NFPI, BMVC 2024) and its earlier version GLEM. See README.md and SPEC §1."""

__version__ = "0.1.0"
