"""User runs never modify a tracked file: on a fresh clone of this commit, the README's smoke
commands, `python report.py`, `python bench.py --shape tiny --parts a --limit 4` and the tiny study
(`python study.py --model tiny-random`, which also shows that the chain runs and ends with its
report) leave `git status --porcelain` empty; so does --replot of every committed example. One
interpreter runs each set (runpy, each as its own __main__ with its own sys.argv), so torch is
imported once, on one thread (tiny tensors)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from zcausal import runs
from helpers import SMOKE_COMMANDS

COMMANDS = list(SMOKE_COMMANDS.values()) + [
    "python report.py",
    "python bench.py --shape tiny --parts a --limit 4 --device cpu",
    "python study.py --model tiny-random",
]
RUNNER = """
import runpy, sys
for command in sys.argv[1:]:
    print("$", command, flush=True)
    sys.argv = command.split()[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def fresh_clone(parent):
    """A fresh clone of HEAD under `parent` (what is committed: commit first what the test needs)."""
    if shutil.which("git") is None or not (runs.REPO / ".git").exists():
        pytest.skip("needs git and a git checkout")
    folder = parent / "repo"
    git("clone", "--quiet", str(runs.REPO), str(folder), cwd=parent)
    return folder


def run_in(folder, commands):
    """The commands (each `python script.py ...`) in one interpreter, in `folder`."""
    return subprocess.run([sys.executable, "-c", RUNNER, *commands], cwd=folder,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    return fresh_clone(tmp_path_factory.mktemp("clone"))


def test_user_runs_leave_a_fresh_clone_clean(clone):
    result = run_in(clone, COMMANDS)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert git("status", "--porcelain", "--untracked-files=all", cwd=clone) == ""
    # what the commands wrote went to git-ignored places
    assert (clone / "results" / "report" / "REPORT.md").is_file()
    assert (clone / "results" / "bench" / "bench.csv").is_file()
    study = result.stdout.split("$ python study.py", 1)[1]
    assert study.index("estimated total") < study.index("[study 1/5] A:") < \
        study.index("[study 5/5] E finished")
    report = (clone / "results" / "tiny-random" / "report" / "REPORT.md").read_text(encoding="utf-8")
    for letter in "ABCDE":
        assert f"\n| {letter} | `exp_{letter.lower()}` | tiny-random |" in report


def test_replot_of_every_committed_example_leaves_a_fresh_clone_clean(tmp_path):
    """`--replot --out <run>` of every committed example, in place: its tables, summaries and
    figures come back the same (runs.write_csv and runs.save_figure keep a file that says the same:
    numbers to the last digits a library version moves, the same pixels). About 80 s."""
    folder = fresh_clone(tmp_path)
    examples = sorted(folder.glob("results/example-*/exp_*/config.json"))
    assert len(examples) >= 10
    commands = [f"python {json.loads(c.read_text(encoding='utf-8'))['command'].split()[0]} "
                f"--replot --out {c.parent.relative_to(folder)}" for c in examples]
    result = run_in(folder, commands)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert git("status", "--porcelain", "--untracked-files=all", cwd=folder) == ""
