"""The own-data config at its repository path; it is `clca_jax/configs/folder.py`, whose docstring
has the commands. `--config=configs/folder.py` (from the repository root) and `--config=folder`
(from any folder) load the same config.
"""

from clca_jax.configs.folder import get_config

__all__ = ["get_config"]
