"""The demo config at its repository path; it is `clca_jax/configs/demo.py`, whose docstring has the
command. `--config=configs/demo.py` (from the repository root) and `--config=demo` (from any folder)
load the same config.
"""

from clca_jax.configs.demo import get_config

__all__ = ["get_config"]
