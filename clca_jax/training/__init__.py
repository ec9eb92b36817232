"""Pieces of the training loop: config, optimizer, sharding, warm start, checkpoints, metrics.

`clca_jax.train` puts them together; each module here is small and tested on its own.
"""
