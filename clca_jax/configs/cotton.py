"""Cotton80 (80 cotton cultivars): the paper's main setting.

    python -m clca_jax.main --config=cotton --workdir=runs/cotton \
        --config.data.dir=/data/cotton

`data.dir` is the folder with the images and the split CSV files (spec 7). Everything else
comes from `common.py`; append `:tiny` to the name (`cotton:tiny`) for a laptop-sized run.
"""

from __future__ import annotations

import ml_collections

from clca_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.get_config(arg)
    config.data.name = "cotton"
    config.model.num_classes = 80
    return config
