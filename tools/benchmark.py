"""`clca_jax.benchmark` from a checkout: `python tools/benchmark.py --config=soyglobal ...`."""

from clca_jax.benchmark import cli

if __name__ == "__main__":
    cli()
