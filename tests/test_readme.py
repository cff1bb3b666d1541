"""The README's commands are the ones the tests run: its smoke block is exactly SMOKE_COMMANDS (each
run end to end by its experiment's tests), and its test command is the one .ci/run runs."""
import re

from zcausal import runs
from helpers import SMOKE_COMMANDS


def readme():
    return (runs.REPO / "README.md").read_text(encoding="utf-8")


def test_readme_smoke_block_is_the_tested_commands():
    section = readme().split("## Smoke runs", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == list(SMOKE_COMMANDS.values())


def test_readme_and_ci_run_the_same_test_command():
    section = readme().split("## Tests", 1)[1]
    command = re.search(r"```bash\n(.*?)\n```", section, re.S).group(1).strip()
    assert command in (runs.REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_names_no_file_outside_the_repository():
    text = readme()
    for outside in ("shared/plan", "NOTES", "/work/", "/root/", "phase3-plan"):
        assert outside not in text
