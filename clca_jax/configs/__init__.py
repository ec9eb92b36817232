"""The shipped experiment configs, loaded by name from any folder (`clca_jax.config_files`).

`common.py` holds the paper's setting, one file per leaf dataset changes only its data and
class count, `folder.py` trains on the user's own folder or CSV files, and `demo.py` runs on
the embedded demo data:

    python -m clca_jax.main --config=soyglobal --workdir=runs/soyglobal ...
    python -m clca_jax.flops --config=soygene:tiny

The repository's top-level `configs/NAME.py` files load these same configs by path.
"""
