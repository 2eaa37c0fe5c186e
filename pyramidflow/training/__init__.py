"""Training: the loop (loop.py) and its resumable state (state.py), the latent template
(template.py), torchrun helpers (distributed.py).
Imports io, the model and the leaves."""
