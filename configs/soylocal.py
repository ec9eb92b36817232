"""SoyLocal config at its repository path; it is `clca_jax/configs/soylocal.py`, whose docstring has
the command. `--config=configs/soylocal.py` (from the repository root) and `--config=soylocal` (from
any folder) load the same config.
"""

from clca_jax.configs.soylocal import get_config

__all__ = ["get_config"]
