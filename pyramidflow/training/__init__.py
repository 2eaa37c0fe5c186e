"""Training: the loop with resumable state, the latent template, distributed helpers.
Imports io, the model and the leaves."""
