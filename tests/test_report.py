"""report.py: a report from small real runs of every script on the tiny model (made here), rebuilt
byte for byte; an empty folder names the experiments without results; an unfinished run is said
to be unfinished."""
import importlib

import pytest

import report
from zcausal import runs
from helpers import TINY_RUN_FLAGS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """results/example-tiny/<run> for each experiment (A, B, C, D with and without
    --drop-numbers, E) and their figures, from the scripts' own main()."""
    root = tmp_path_factory.mktemp("report")
    runs_to_make = [(script, script[:5], []) for script in TINY_RUN_FLAGS]
    runs_to_make += [("exp_d_bridge.py", "exp_d_drop_numbers", ["--drop-numbers"])]
    for script, name, extra in runs_to_make:
        module = importlib.import_module(script[:-3])
        module.main(module.parse_args(
            ["--model", "tiny-random", "--out", str(root / "results" / "example-tiny" / name),
             "--figures", str(root / "figures")] + TINY_RUN_FLAGS[script] + extra))
    return root


def build(root, name="REPORT.md"):
    return report.main(report.build_parser().parse_args(
        ["--results", str(root / "results"), "--out", str(root / "results" / name),
         "--figures", str(root / "figures")]))


def test_report_has_every_section_and_rebuilds_to_the_same_bytes(results):
    build(results)
    text = (results / "results" / "REPORT.md").read_text(encoding="utf-8")
    figure = results / "figures" / report.SWEEP_FIGURE
    first = figure.read_bytes()
    for letter, title, _ in report.EXPERIMENTS.values():
        assert f"### {letter}: {title}" in text
    for name in ("exp_a", "exp_b", "exp_c", "exp_d", "exp_d_drop_numbers", "exp_e"):
        assert f"`{name}`" in text  # a row of the cross-model table
    assert "No results" not in text and "not finished" not in text
    assert "Unpatched, the model answered" in text  # A's own verdict paragraph
    assert "Full interchange " in text and "Primary test (declared)" in text  # E's
    assert f"]({report.SWEEP_FIGURE.join(['../figures/', ''])})" in text
    assert "](../figures/example-tiny/exp_b/residual_ratio.png)" in text
    assert "the flags are config.json's args" in text  # main() called from Python: no command
    assert str(results) not in text  # no absolute path of this machine
    build(results)
    assert (results / "results" / "REPORT.md").read_text(encoding="utf-8") == text
    assert figure.read_bytes() == first


def test_an_unfinished_run_is_reported_as_such(results, tmp_path):
    import shutil
    shutil.copytree(results / "results", tmp_path / "results")
    (tmp_path / "results" / "example-tiny" / "exp_b" / "per_layer.csv").unlink()
    sweep = tmp_path / "results" / "example-tiny" / "exp_e" / "per_layer.csv"
    per_layer = runs.load_csv(sweep)
    assert 3 in set(per_layer.layer)
    runs.write_csv(per_layer[per_layer.layer != 3], sweep)  # a sweep stopped before its last layer
    build(tmp_path)
    text = (tmp_path / "results" / "REPORT.md").read_text(encoding="utf-8")
    for name in ("exp_b", "exp_e"):
        section = text.split(f"(`example-tiny/{name}`)")[1].split("###")[0]
        assert "No results: the run has not finished" in section, name
    assert "| not finished" in text and not (tmp_path / "figures" / report.SWEEP_FIGURE).exists()


def test_empty_folder_names_every_experiment_without_results(tmp_path):
    (tmp_path / "results").mkdir()
    build(tmp_path)
    text = (tmp_path / "results" / "REPORT.md").read_text(encoding="utf-8")
    for letter, title, _ in report.EXPERIMENTS.values():
        assert f"{letter} ({title})" in text
    assert "## Across models" not in text


def test_missing_results_folder_is_a_usage_error(tmp_path):
    with pytest.raises(report.UsageError, match="--results"):
        build(tmp_path / "nowhere")
