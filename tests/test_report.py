"""report.py: a report from small real runs of every script on the tiny model (made here): one scan
table first, then a section per run led by its figures and headline, rebuilt byte for byte; the
committed examples only with --examples; an empty folder names the experiments without results; an
unfinished run is said to be unfinished; a run outside results/ is found with its figures."""
import importlib
import shutil

import pytest

import report
from zcausal import runs
from helpers import TINY_RUN_FLAGS

pytestmark = pytest.mark.usefixtures("one_thread")
RUN_NAMES = ("exp_a", "exp_b", "exp_c", "exp_d", "exp_d_drop_numbers", "exp_e")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """<root>/results/tiny/<run> for each experiment (A, B, C, D with and without
    --drop-numbers, E) and their figures under <root>/figures, from the scripts' own main()."""
    root = tmp_path_factory.mktemp("report")
    runs_to_make = [(script, script[:5], []) for script in TINY_RUN_FLAGS]
    runs_to_make += [("exp_d_bridge.py", "exp_d_drop_numbers", ["--drop-numbers"])]
    for script, name, extra in runs_to_make:
        module = importlib.import_module(script[:-3])
        module.main(module.parse_args(
            ["--model", "tiny-random", "--out", str(root / "results" / "tiny" / name),
             "--figures", str(root / "figures")] + TINY_RUN_FLAGS[script] + extra))
    return root


def build(root, *argv, monkeypatch):
    """report.py's main with `argv`, run from `root` (its defaults are relative, as the scripts')."""
    monkeypatch.chdir(root)
    return root / report.main(report.build_parser().parse_args(list(argv)))


def test_report_scans_first_then_details_and_rebuilds_to_the_same_bytes(results, monkeypatch):
    path = build(results, monkeypatch=monkeypatch)
    assert path == results / "results" / "report" / "REPORT.md"
    text = path.read_text(encoding="utf-8")
    figure = path.parent / report.SWEEP_FIGURE
    first = figure.read_bytes()
    table = text.split("## At a glance", 1)[1].split("\n\n")[1].splitlines()
    assert table[0].startswith("| experiment | run | model |") and len(table) == 2 + len(RUN_NAMES)
    for name in RUN_NAMES:  # a row per run, with its verdict in bold
        row = next(line for line in table if f"`tiny/{name}`" in line)
        assert row.count("**") == 2 and "not finished" not in row
        assert "(exploratory)**" in row  # tiny-model runs are not the declared runs
    assert text.index("## At a glance") < text.index(f"]({report.SWEEP_FIGURE})") < \
        text.index("### ")
    for letter, title, _ in report.EXPERIMENTS.values():
        assert f"### {letter}: {title}" in text
    b = text.split("(`tiny/exp_b`)", 1)[1].split("### ")[0]
    assert b.index("](../../figures/tiny/exp_b/residual_ratio.png)") < b.index("\n- ") < \
        b.index("Full summary: ")
    assert "Unpatched, the model answered" in text  # A's own verdict paragraph
    assert "Full interchange " in text and "Primary test: " in text  # E's
    assert text.count("Full summary: Exploratory run: ") == len(RUN_NAMES)
    assert "the flags are config.json's args" in text  # main() called from Python: no command
    assert str(results) not in text and "No results" not in text  # no absolute path
    build(results, monkeypatch=monkeypatch)
    assert path.read_text(encoding="utf-8") == text and figure.read_bytes() == first


def test_committed_examples_are_reported_only_with_examples(results, tmp_path):
    shutil.copytree(results / "results" / "tiny", tmp_path / "results" / "example-tiny")
    shutil.copytree(results / "results" / "tiny" / "exp_b", tmp_path / "results" / "mine" / "exp_b")
    figures = results / "figures"
    mine = report.build_report(tmp_path / "results", tmp_path / "r" / "REPORT.md", figures)
    assert "`mine/exp_b`" in mine and "example-tiny" not in mine
    assert "`python report.py --examples`" in mine  # where the examples are, for the missing ones
    examples = report.build_report(tmp_path / "results", tmp_path / "e" / "REPORT.md", figures,
                                   examples=True)
    assert "`example-tiny/exp_e`" in examples and "mine" not in examples


@pytest.mark.parametrize("argv, message", [
    (["--examples", "--out", "x.md"], "drop --out"),
    (["--examples", "--results", "results"], "drop --results"),
    (["--out", str(runs.REPO / "results" / "REPORT.md")], "committed report; build it with --examples"),
    (["--results", "nowhere"], "--results nowhere: no such folder"),
])
def test_bad_command_is_a_usage_error_and_writes_nothing(argv, message, tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    committed = (runs.REPO / "results" / "REPORT.md").read_bytes()
    with pytest.raises(report.UsageError, match=message):
        build(tmp_path, *argv, monkeypatch=monkeypatch)
    assert list(tmp_path.rglob("*.md")) == []
    assert (runs.REPO / "results" / "REPORT.md").read_bytes() == committed


def test_an_unfinished_run_is_reported_as_such(results, tmp_path, monkeypatch):
    shutil.copytree(results / "results", tmp_path / "results")
    shutil.rmtree(tmp_path / "results" / "report", ignore_errors=True)
    (tmp_path / "results" / "tiny" / "exp_b" / "per_layer.csv").unlink()
    sweep = tmp_path / "results" / "tiny" / "exp_e" / "per_layer.csv"
    per_layer = runs.load_csv(sweep)
    assert 3 in set(per_layer.layer)
    runs.write_csv(per_layer[per_layer.layer != 3], sweep)  # a sweep stopped before its last layer
    text = build(tmp_path, monkeypatch=monkeypatch).read_text(encoding="utf-8")
    for name in ("exp_b", "exp_e"):
        section = text.split(f"(`tiny/{name}`)")[1].split("###")[0]
        assert "No results: the run has not finished" in section, name
        row = next(line for line in text.splitlines() if f"| `tiny/{name}` |" in line)
        assert "**not finished**" in row
    assert not (tmp_path / "results" / "report" / report.SWEEP_FIGURE).exists()


def test_empty_folder_names_every_experiment_without_results(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    text = build(tmp_path, monkeypatch=monkeypatch).read_text(encoding="utf-8")
    for letter, title, _ in report.EXPERIMENTS.values():
        assert f"{letter} ({title})" in text
    assert "## At a glance" not in text


def test_a_run_outside_results_keeps_its_figures_beside_it_and_the_report_finds_them(
        tmp_path, monkeypatch):
    import exp_b_residual as B
    checkout, out = tmp_path / "checkout", tmp_path / "elsewhere" / "exp_b"
    checkout.mkdir()
    monkeypatch.chdir(checkout)  # the default --figures is the working folder's figures/
    B.main(B.parse_args(["--model", "tiny-random", "--out", str(out)]
                        + TINY_RUN_FLAGS["exp_b_residual.py"]))
    assert (out / "figures" / "residual_ratio.png").is_file() and not any(checkout.iterdir())
    text = build(checkout, "--results", str(out.parent), monkeypatch=monkeypatch).read_text(
        encoding="utf-8")
    assert "](../exp_b/figures/residual_ratio.png)" in text
