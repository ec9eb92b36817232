"""SoyAgeing config at its repository path; it is `clca_jax/configs/soyageing.py`, whose docstring
has the command. `--config=configs/soyageing.py` (from the repository root) and `--config=soyageing`
(from any folder) load the same config.
"""

from clca_jax.configs.soyageing import get_config

__all__ = ["get_config"]
