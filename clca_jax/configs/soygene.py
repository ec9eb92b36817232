"""SoyGene (1,110 soybean cultivars, one leaf photo per plant): the paper's main setting.

    python -m clca_jax.main --config=soygene --workdir=runs/soygene \
        --config.data.dir=/data/soygene

`data.dir` is the folder with the images and the split CSV files (spec 7). Everything else
comes from `common.py`; append `:tiny` to the name (`soygene:tiny`) for a laptop-sized run.
"""

from __future__ import annotations

import ml_collections

from clca_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.get_config(arg)
    config.data.name = "soygene"
    config.model.num_classes = 1110
    return config
