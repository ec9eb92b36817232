"""Prepares a leaf dataset once, before a multi-host run, so that hosts do not prepare it at once.

    python -m clca_jax.data.prepare --dataset=soygene --manual_dir=/data/soygene \
        --tfds_dir=~/tensorflow_datasets

It reads the images and split files of `--manual_dir` and writes the prepared data to
`--tfds_dir` (see `clca_jax.data.ufgir`); a run with `data.dir` and `data.tfds_dir` set to the
same folders then finds it prepared. It prints the examples of every split.

The command lives apart from the builders: `python -m` on their module would run it a second
time as `__main__` and register every builder twice.
"""

from __future__ import annotations

import argparse

from clca_jax import user_errors
from clca_jax.data import ufgir


def main(argv: list[str] | None = None) -> None:
    """Command line: prepare one leaf dataset (run once before a multi-host job)."""
    parser = argparse.ArgumentParser(prog="clca-prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=sorted(ufgir.LEAF_DATASETS))
    parser.add_argument("--manual_dir", required=True, help="folder with images and CSV files")
    parser.add_argument("--tfds_dir", default="~/tensorflow_datasets")
    parser.add_argument("--skip_bad_images", action="store_true")
    parser.add_argument("--no_check_published_counts", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    with user_errors.reported(args.debug):
        builder = ufgir.prepare(
            args.dataset,
            args.manual_dir,
            args.tfds_dir,
            args.skip_bad_images,
            not args.no_check_published_counts,
        )
    for split, info in sorted(builder.info.splits.items()):
        print(f"{split}: {info.num_examples} examples")


def cli() -> None:
    """`python -m clca_jax.data.prepare`, the `clca-prepare` command."""
    main()


if __name__ == "__main__":
    cli()
