"""SoyGene config at its repository path; it is `clca_jax/configs/soygene.py`, whose docstring has
the command. `--config=configs/soygene.py` (from the repository root) and `--config=soygene` (from
any folder) load the same config.
"""

from clca_jax.configs.soygene import get_config

__all__ = ["get_config"]
