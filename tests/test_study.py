"""study.py without running the chain (tests/test_clean_tree.py runs the tiny study end to end on a
fresh clone): what it plans (--resume where a run exists, --smoke on tiny-random where a script
has it), bad input refused before anything is written, and an interruption's advice."""
import pytest

import study
from zcausal import runs


def args_for(out, *extra):
    return study.parse_args(["--model", "tiny-random", "--out", str(out), *extra])


def test_a_folder_holding_a_run_is_continued_and_tiny_gets_the_smoke_presets(tmp_path):
    (tmp_path / "exp_b").mkdir()
    (tmp_path / "exp_b" / "config.json").write_text("{}")
    (tmp_path / "exp_c").mkdir()  # an empty folder (cut off before config.json): a new run
    steps = study.plan(args_for(tmp_path))
    assert [s["letter"] for s in steps] == list("ABCDE")
    assert [s["resume"] for s in steps] == [False, True, False, False, False]
    for step in steps:
        assert ("--resume" in step["argv"]) == step["resume"]
        assert step["args"].out == tmp_path / f"exp_{step['letter'].lower()}"
        assert getattr(step["args"], "smoke", False) == ("--smoke" in step["argv"])
    assert "--smoke" in steps[0]["argv"] and steps[0]["args"].smoke  # A has its preset
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp_b", "exp_c"]  # nothing written


def test_the_default_out_is_named_for_the_model():
    assert study.parse_args(["--model", "Qwen/Qwen2.5-3B"]).out.as_posix() == "results/qwen2.5-3b"


@pytest.mark.parametrize("case", ["out is a file", "no such model"])
def test_bad_input_exits_2_before_anything_is_written(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    args = (args_for(tmp_path / "file" / "study") if case == "out is a file" else
            study.parse_args(["--model", str(tmp_path / "missing-model"), "--out", "study"]))
    with pytest.raises(SystemExit) as exit_info:
        runs.run_cli(study.main, args, study.CONTINUE)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error:") and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_an_interrupted_study_says_to_rerun_the_same_command(tmp_path, monkeypatch, capsys):
    def interrupted(step, i, n):
        raise KeyboardInterrupt
    monkeypatch.setattr(study, "run_step", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        runs.run_cli(study.main, args_for(tmp_path / "s"), study.CONTINUE)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 130 and "estimated total" in out
    assert "rerun the same command (the study resumes itself)" in err and "--resume" not in err
