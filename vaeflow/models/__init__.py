"""The model layer: networks, posteriors, priors, likelihoods, the VAE, its bounds, and
``build_model`` (config -> VAE). Imports flows, layers and config, never the run layer
(docs/design.md §2)."""
