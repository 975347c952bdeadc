"""deqlab: Deep Equilibrium Models (DEQ) and Multiscale DEQs (MDEQ) in PyTorch."""

__version__ = "0.1.0"
