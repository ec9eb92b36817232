"""Experiment configs: `common.py` (the paper's setting), one file per dataset, `demo.py`."""
