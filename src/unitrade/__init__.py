"""unitrade: a multi-region, active-active trading platform for e-commerce."""

__version__ = "0.1.0"
