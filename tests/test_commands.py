"""Every command the documentation shows runs as typed: `--help` of each, and the preparation of
a leaf dataset from another folder.

The commands are read from where users find them (README.md, the Makefile, the notebooks and
the docstrings and comments of the package, the configs and the tools), so a command documented
later is tested too.
"""

from __future__ import annotations

import glob
import importlib
import os
import re
import subprocess
import sys
import tomllib

import pytest

from clca_jax.data import fabricate, ufgir
from tests import command_line
from tests.command_line import REPO

# `python -m clca_jax.X [SUBCOMMAND]` or `python tools/X.py`; a subcommand is a lowercase word
# followed by a flag, a closing backtick or the end of the line.
_COMMAND = re.compile(
    r"(?:python|\$\(PYTHON\)) (?:-m (clca_jax(?:\.\w+)+)|(tools/\w+\.py))(?: ([a-z]+)(?= --|`|$))?",
    re.MULTILINE,
)
_DOCUMENTS = ("README.md", "Makefile", "notebooks/*.ipynb", "clca_jax/**/*.py", "configs/*.py")
_DOCUMENTS += ("tools/*.py",)


def documented_commands() -> dict[tuple[str, ...], list[str]]:
    """Each documented command (`("-m", module[, subcommand])` or `(script[, subcommand])`)
    and the files that show it."""
    commands = {}
    for pattern in _DOCUMENTS:
        for path in sorted(glob.glob(os.path.join(REPO, pattern), recursive=True)):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            for match in _COMMAND.finditer(text):
                module, script, subcommand = match.groups()
                command = ("-m", module) if module else (script,)
                command += (subcommand,) if subcommand else ()
                commands.setdefault(command, []).append(os.path.relpath(path, REPO))
    return commands


DOCUMENTED = documented_commands()

with open(os.path.join(REPO, "pyproject.toml"), "rb") as _f:
    SCRIPTS = tomllib.load(_f)["project"]["scripts"]
# `clca-NAME [SUBCOMMAND]` where the documentation shows an installed command.
_SCRIPT = re.compile(r"(?<![\w./-])(clca-[a-z]+)(?: ([a-z]+)(?= --|`|$))?", re.MULTILINE)


def documented_scripts() -> dict[tuple[str, ...], list[str]]:
    """Each installed command the documentation shows, as `(name[, subcommand])`."""
    shown = {}
    for pattern in _DOCUMENTS:
        for path in sorted(glob.glob(os.path.join(REPO, pattern), recursive=True)):
            with open(path, encoding="utf-8") as f:
                for name, subcommand in _SCRIPT.findall(f.read()):
                    command = (name, subcommand) if subcommand else (name,)
                    shown.setdefault(command, []).append(os.path.relpath(path, REPO))
    return shown


def installed(name: str) -> str:
    """The console script `name` of the environment running the tests."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    assert os.path.isfile(path), (
        f"{name} is not installed beside {sys.executable}; reinstall the package "
        "(pip install -e .) so that pyproject.toml's [project.scripts] are created."
    )
    return path


def test_the_documentation_shows_every_command():
    expected = {
        ("-m", "clca_jax.main"),
        ("-m", "clca_jax.evaluate"),
        ("-m", "clca_jax.flops"),
        ("-m", "clca_jax.visualize", "kept"),
        ("-m", "clca_jax.visualize", "attention"),
        ("-m", "clca_jax.visualize", "sweep"),
        ("-m", "clca_jax.convert.cli"),
        ("-m", "clca_jax.data.prepare"),
        ("-m", "clca_jax.predict"),
        ("tools/convert_timm_weights.py",),
        ("tools/benchmark.py",),
        ("tools/bench_input.py",),
    }
    assert expected <= set(DOCUMENTED), sorted(DOCUMENTED)


@pytest.mark.parametrize("command", sorted(DOCUMENTED), ids=" ".join)
def test_documented_command_prints_its_help(command, tmp_path):
    done = command_line.run([*command, "--help"], cwd=REPO, tmp=str(tmp_path))
    where = ", ".join(sorted(set(DOCUMENTED[command])))
    assert done.returncode == 0, f"documented in {where}:\n{done.stderr[-3000:]}"
    assert "--" in done.stdout  # the flags are listed


def test_prepare_command_prepares_a_leaf_dataset_from_another_folder(tmp_path):
    manual, tfds_dir = tmp_path / "manual", tmp_path / "tfds"
    fabricate.leaf_dataset(str(manual), "soygene", ufgir.LEAF_DATASETS["soygene"].image_folder)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = command_line.run(
        [
            "-m",
            "clca_jax.data.prepare",
            "--dataset=soygene",
            f"--manual_dir={manual}",
            f"--tfds_dir={tfds_dir}",
            "--no_check_published_counts",
        ],
        cwd=str(elsewhere),
        tmp=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # 3 classes: 5 train_val images each (4 train, 1 val), 2 test images each.
    assert done.stdout.splitlines()[-4:] == [
        "test: 6 examples",
        "train: 12 examples",
        "train_val: 15 examples",
        "val: 3 examples",
    ]
    assert os.listdir(tfds_dir / "ufgir_soygene")  # prepared where --tfds_dir says


def test_every_installed_command_is_also_a_module_with_its_own_help():
    """[project.scripts] names one `cli()` per command, whose module is its `python -m` form,
    one prefix for all; and every installed command the documentation shows exists."""
    assert all(name.startswith("clca-") for name in SCRIPTS)
    for name, target in SCRIPTS.items():
        module, _, function = target.partition(":")
        assert function == "cli", name
        assert callable(importlib.import_module(module).cli)
    assert {command[0] for command in documented_scripts()} <= set(SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_installed_command_prints_its_own_help_from_any_folder(name, tmp_path):
    """The help of a console script names it (argparse) or starts with its module's docstring
    (absl: its `__main__` is a generated wrapper without one), and exits with status 0."""
    module = importlib.import_module(SCRIPTS[name].partition(":")[0])
    done = subprocess.run([installed(name), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    first_line = (module.__doc__ or "").strip().splitlines()[0]
    assert first_line in done.stdout or done.stdout.startswith(f"usage: {name} "), done.stdout
    assert "--" in done.stdout


@pytest.mark.parametrize("command", sorted(documented_scripts()), ids=" ".join)
def test_documented_installed_command_prints_its_help(command, tmp_path):
    done = subprocess.run(
        [installed(command[0]), *command[1:], "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_config_driven_commands_list_the_common_fields_in_their_help(tmp_path):
    for name in ("clca-train", "clca-evaluate", "clca-flops", "clca-demo"):
        done = subprocess.run(
            [installed(name), "--help"], cwd=tmp_path, capture_output=True, text=True
        )
        assert "--config.model.reduction.keep_rate=1.0" in done.stdout, name
        assert "--config.train.epochs=50" in done.stdout, name


def test_visualize_subcommands_describe_themselves():
    for subcommand, words in (("kept", "kept or merged"), ("attention", "class-token attention")):
        done = subprocess.run(
            [sys.executable, "-m", "clca_jax.visualize", subcommand, "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0 and words in done.stdout, done.stdout
