"""SoyGlobal config at its repository path; it is `clca_jax/configs/soyglobal.py`, whose docstring
has the command. `--config=configs/soyglobal.py` (from the repository root) and `--config=soyglobal`
(from any folder) load the same config.
"""

from clca_jax.configs.soyglobal import get_config

__all__ = ["get_config"]
