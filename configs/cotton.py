"""Cotton80 config at its repository path; it is `clca_jax/configs/cotton.py`, whose docstring has
the command. `--config=configs/cotton.py` (from the repository root) and `--config=cotton` (from any
folder) load the same config.
"""

from clca_jax.configs.cotton import get_config

__all__ = ["get_config"]
