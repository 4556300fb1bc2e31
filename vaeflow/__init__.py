"""vaeflow: variational autoencoders with normalizing flows, exact and tested.

The flow library lives in :mod:`vaeflow.flows` and is usable on its own.
"""

__version__ = "0.1.0"
