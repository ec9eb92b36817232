"""SoyAgeing (198 soybean cultivars at several growth stages): the paper's main setting.

    python -m clca_jax.main --config=soyageing --workdir=runs/soyageing \
        --config.data.dir=/data/soyageing

`data.dir` is the folder with the images and the split CSV files (spec 7). Everything else
comes from `common.py`; append `:tiny` to the name (`soyageing:tiny`) for a laptop-sized run.
"""

from __future__ import annotations

import ml_collections

from clca_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.get_config(arg)
    config.data.name = "soyageing"
    config.model.num_classes = 198
    return config
