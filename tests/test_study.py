"""study.py without running the chain (tests/test_clean_tree.py runs the tiny study end to end on a
fresh clone): what it plans (--resume where a run exists, --smoke on tiny-random where a script
has it), bad input refused before anything is written, and an interruption's advice."""
import json

import pytest

import common
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
    def interrupted(step, i, n, guess=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(study, "run_step", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        runs.run_cli(study.main, args_for(tmp_path / "s"), study.CONTINUE)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 130 and "estimated total" in out
    assert "rerun the same command (the study resumes itself)" in err and "--resume" not in err


def write_mgsm(folder, n):
    """n parallel MGSM-style problems (question TAB answer), English and Chinese."""
    for lang, text in (("en", "Tom has {} apples. How many?"), ("zh", "小明有{}个苹果。一共有多少个？")):
        (folder / f"mgsm_{lang}.tsv").write_text(
            "".join(f"{text.format(i + 2)}\t{i + 2}\n" for i in range(n)), encoding="utf-8")
    return folder / "mgsm_en.tsv", folder / "mgsm_zh.tsv"


def test_mgsm_goes_to_b_and_d_and_the_seed_to_every_experiment(tmp_path):
    en, zh = write_mgsm(tmp_path, 30)
    steps = study.plan(args_for(tmp_path / "s", "--prompts-en", str(en), "--prompts-zh", str(zh),
                                "--seed", "3"))
    for step in steps:
        takes = step["letter"] in study.MGSM_TAKERS
        assert (step["args"].prompts_en == en) == takes and (step["args"].prompts_zh == zh) == takes
        assert step["args"].seed == 3
    assert {s["letter"]: s["pairs"] for s in steps}["D"] == 24  # D's --smoke --limit of the 30


def test_a_d_whose_pairs_do_not_exceed_k_plus_one_is_refused_before_anything_runs(
        tmp_path, monkeypatch):
    import exp_d_bridge
    monkeypatch.setitem(exp_d_bridge.SMOKE, "limit", 9)  # --smoke's k 4 8: N = 9 <= 8 + 1
    en, zh = write_mgsm(tmp_path, 30)
    with pytest.raises(runs.UsageError, match="k = 8 on 9 pairs.*--prompts-en"):
        study.plan(args_for(tmp_path / "s", "--prompts-en", str(en), "--prompts-zh", str(zh)))
    assert not (tmp_path / "s").exists()


def test_overwrite_replaces_the_runs_instead_of_continuing_them(tmp_path):
    (tmp_path / "exp_c").mkdir()
    (tmp_path / "exp_c" / "config.json").write_text(json.dumps({"script": "exp_c_ard_mmd.py"}))
    steps = study.plan(args_for(tmp_path, "--overwrite"))
    c = steps[2]
    assert c["args"].overwrite and not c["args"].resume and "--overwrite" in c["argv"]
    assert not any(s["args"].overwrite for s in steps if s["letter"] != "C")


def test_every_experiment_is_estimated_from_the_cost_model(tmp_path, monkeypatch):
    """One bench row per part on this device: each step's estimate rests on it (fixed + rate x
    the step's work), none is 'not estimated'."""
    import pandas as pd
    from zcausal import cost
    rows = pd.DataFrame([{**{c: None for c in cost.COLUMNS}, "run": "r", "shape": "tiny",
                          "device": cost.device_name("cpu"), "part": part, "status": "ok",
                          "seconds": 2.0, "pairs": 4, "work": 100.0, "smoke_seconds": 1.0,
                          "smoke_work": 10.0, "matmul_tflops": 0.1} for part in "abcde"])
    monkeypatch.setattr(cost, "cost_rows", lambda tables=None: rows)
    monkeypatch.setattr(cost, "matmul_tflops", lambda device, dtype: 0.1)
    args = args_for(tmp_path / "s", "--device", "cpu")
    steps = study.plan(args)
    guesses, _ = study.estimates(steps, args)
    config = common.load_model_config("tiny-random")
    scale = cost.parameter_count(config) / cost.shape_parameters("tiny")  # the rate scales
    for step, (seconds, basis) in zip(steps, guesses):
        work = step["module"].work(step["args"], step["pairs"], config)
        assert seconds == pytest.approx(1.0 - 10 / 90 + work / 90 * scale)
        assert "units of work" in basis
