"""The run layer: training loop, evaluation, checkpoints, logs, optimiser, device.
Imports the model and data layers (docs/design.md §2). Empty on purpose: the modules
are imported by name (``vaeflow.run.train``), and the public functions are re-exported
from :mod:`vaeflow`."""
