"""Tools on top of runs: sweeps, reports and figures, 2-D toy densities. May import every
layer below (docs/design.md §2)."""
