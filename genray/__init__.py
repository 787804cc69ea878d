"""genray: train, bulk-run and serve generative image models on Ray."""

__version__ = "0.1.0"
