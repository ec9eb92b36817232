"""Pieces of the training loop, each small and tested on its own; `clca_jax.train` puts them
together, and `clca_jax.evaluate`, `predict` and `export` import what they need without an
optimizer.

config (defaults, validation, flag parsing), optim (optimizers, schedules, layer-wise rates,
freezing), precision (float16's loss scale), losses, mixup, ema, sharding (mesh, placement,
global batches), checkpoint (orbax), warm_start, evaluation (eval step, passes, throughput,
summary), metrics (clu collections, TensorBoard, progress line), workdirs (saved run config,
lock), preemption (SIGTERM).
"""
