"""Running the project's commands as a user types them, from any folder.

`run` starts `python ARGS` in a subprocess whose only importable part of the repository is the
`clca_jax` package these tests import: PYTHONPATH holds a folder with nothing but a link to
it. So the command runs this checkout's code even where another checkout is installed (a git
worktree beside an editable install), and an import of the repository's top-level `configs`
or `tests` fails there as it does for a user who installed the package.
"""

from __future__ import annotations

import os
import subprocess
import sys

import clca_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.dirname(os.path.abspath(clca_jax.__file__))


def package_only_path(root: str) -> str:
    """A folder under `root` holding only a link to the `clca_jax` package under test."""
    folder = os.path.join(root, "package_only")
    os.makedirs(folder, exist_ok=True)
    link = os.path.join(folder, "clca_jax")
    if not os.path.islink(link):
        os.symlink(PACKAGE, link)
    return folder


def run(args: list[str], cwd: str, tmp: str) -> subprocess.CompletedProcess:
    """`python ARGS` run in `cwd`, with only the package importable (see the module docstring).

    Args:
      args: the arguments after `python` (`-m`, a module and its flags, or a script path).
      cwd: the working directory.
      tmp: a temporary folder for the package link.

    Returns:
      The finished process, its output captured as text.
    """
    env = dict(os.environ, PYTHONPATH=package_only_path(tmp))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
