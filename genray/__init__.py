"""genray: train, bulk-run and serve generative image models on Ray."""

from genray.runtime import prepare_local_env

__version__ = "0.1.0"

# Importing genray defaults Ray's local-instance variables (loopback-only listeners, ...), so any program that
# imports genray before it starts Ray gets them without having to remember a call.
prepare_local_env()
