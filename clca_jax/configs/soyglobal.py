"""SoyGlobal (1,938 soybean cultivars): the paper's main setting.

    python -m clca_jax.main --config=soyglobal --workdir=runs/soyglobal \
        --config.data.dir=/data/soyglobal

`data.dir` is the folder with the images and the split CSV files (spec 7). Everything else
comes from `common.py`; append `:tiny` to the name (`soyglobal:tiny`) for a laptop-sized run.
"""

from __future__ import annotations

import ml_collections

from clca_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.get_config(arg)
    config.data.name = "soyglobal"
    config.model.num_classes = 1938
    return config
