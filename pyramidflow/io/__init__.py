"""Files in and out: images and their formats, dataset layouts, model checkpoints, the
authors' checkpoints, atomic writes and inference-graph export. Imports the model and
the leaves."""
