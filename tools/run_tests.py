"""The test suite as `make test` runs it: pytest in a few separate processes.

    python tools/run_tests.py [PYTEST_ARGS...]    # any pytest flags: -x, -k NAME, --durations=20

The test files are split, in name order, into `GROUPS` runs, each a fresh interpreter, and
the files that load ONNX Runtime and jax2onnx into the test process run on their own. One
process running the whole suite crashed twice inside XLA's CPU compiler on an AMD EPYC (Zen 5),
about 730 tests in: a segmentation fault compiling an eager `lax.map` in
`tests/test_method_knobs.py`, whose tests pass in a process of their own. Separate processes
keep what one group loads and compiles out of the next. The exit status is the first failing
group's (pytest's 5, no tests collected, counts as a failure); a closing line
(`total: N passed, N failed`) sums the groups.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = 3
# Test files whose tests load ONNX Runtime / jax2onnx into the pytest process itself.
ON_THEIR_OWN = ("tests/test_export.py", "tests/test_predict.py")
SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")


def groups() -> list[list[str]]:
    files = sorted(
        os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "tests", "test_*.py"))
    )
    alone = [path for path in files if path in ON_THEIR_OWN]
    rest = [path for path in files if path not in ON_THEIR_OWN]
    size = -(-len(rest) // GROUPS)
    return [rest[i : i + size] for i in range(0, len(rest), size)] + [alone]


def main(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        print(__doc__)
        return 0
    totals: dict[str, int] = {}
    status = 0
    for files in groups():
        command = [sys.executable, "-m", "pytest", *args, *files]
        print(f"== pytest {' '.join(args + files)}", flush=True)
        last = ""
        with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) as run:
            for line in run.stdout:  # passed through as it comes
                sys.stdout.write(line)
                sys.stdout.flush()
                last = line if line.strip() else last
        for count, word in SUMMARY.findall(last):
            key = "errors" if word.startswith("error") else word
            totals[key] = totals.get(key, 0) + int(count)
        code = run.returncode
        if code == 5:
            print("pytest collected no tests in this group: failing")
            code = 1
        if code and not status:
            status = code
    passed, failed = totals.get("passed", 0), totals.get("failed", 0) + totals.get("errors", 0)
    closing = f"{passed} passed, {failed} failed"
    if totals.get("skipped"):
        closing += f", {totals['skipped']} skipped"
    print(f"total: {closing}")
    if not passed and not status:
        status = 1  # nothing ran
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
