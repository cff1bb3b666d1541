"""Input a user gets wrong: problem files (swapped MGSM files, an empty file, a non-numeric answer,
a folder for a file), flags out of range, output paths that cannot be made, a folder that holds
something else. Each is one line naming the fix (exit 2 from a script) and nothing is written: the
folder the command runs in stays empty, and a folder given to it keeps what it held."""
import json
import os
from pathlib import Path

import pytest

import bench
import exp_a_patching as A
import exp_b_residual as B
import exp_c_ard_mmd as C
import exp_d_bridge as D
import exp_e_layer_sweep as E
import report
import study
from zcausal import problems, runs

SCRIPTS = {"A": A, "B": B, "C": C, "D": D, "E": E}


def write_mgsm(folder, en_questions=("Tom has 2 apples. How many?", "A bus has 3 seats. How many?"),
               zh_questions=("小明有2个苹果。一共有多少个？", "公交车有3个座位。一共有多少个？"),
               answers=("2", "3")):
    for lang, questions in (("en", en_questions), ("zh", zh_questions)):
        (folder / f"mgsm_{lang}.tsv").write_text(
            "".join(f"{q}\t{a}\n" for q, a in zip(questions, answers)), encoding="utf-8")
    return folder / "mgsm_en.tsv", folder / "mgsm_zh.tsv"


def exit_of(argv, tmp_path, monkeypatch, capsys, script=B, smoke=False):
    """(exit status, stderr) of `script` (a module with parse_args and main; exp_b_residual.py)
    with `argv`, run in tmp_path/run (made here if it does not exist); asserts that run/ is as it
    was (nothing written in it) and that the error is one line."""
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    before = sorted(run.rglob("*"))
    monkeypatch.chdir(run)
    argv = (["--model", "tiny-random"] if script is not report else []) + (
        ["--smoke"] if smoke else []) + list(map(str, argv))
    parse = script.build_parser().parse_args if script is report else script.parse_args
    with pytest.raises(SystemExit) as exit_info:
        runs.run_cli(script.main, parse(argv))
    assert sorted(run.rglob("*")) == before  # nothing written
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return exit_info.value.code, err


def test_swapped_mgsm_files_exit_2_naming_the_swap(tmp_path, monkeypatch, capsys):
    en, zh = write_mgsm(tmp_path)
    code, err = exit_of(["--prompts-en", zh, "--prompts-zh", en], tmp_path, monkeypatch, capsys)
    assert code == 2 and "\n" not in err
    assert "swapped" in err and "other way round" in err and str(zh) in err
    assert len(problems.read_mgsm(en, zh)) == 2  # the right way round they load


def test_a_file_in_the_wrong_language_is_named(tmp_path):
    en, _ = write_mgsm(tmp_path)
    with pytest.raises(runs.UsageError, match="--prompts-zh .* are not Chinese"):
        problems.read_mgsm(en, en)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_an_empty_mgsm_file_is_reported_as_empty(tmp_path, lang):
    en, zh = write_mgsm(tmp_path)
    (tmp_path / f"mgsm_{lang}.tsv").write_text("", encoding="utf-8")
    with pytest.raises(runs.UsageError, match=f"mgsm_{lang}.tsv is empty; pass --prompts-{lang}"):
        problems.read_mgsm(en, zh)


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_an_empty_prompts_file_is_reported_as_empty_not_as_invalid_json(
        text, tmp_path, monkeypatch, capsys):
    (tmp_path / "prompts.json").write_text(text, encoding="utf-8")
    code, err = exit_of(["--prompts", tmp_path / "prompts.json"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "is empty" in err and "JSON" not in err


def test_a_non_numeric_answer_names_the_pair_and_the_fix(tmp_path):
    data = problems.load_prompts()
    data["pairs"][1]["answer"] = "42 apples"
    (tmp_path / "prompts.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(runs.UsageError) as err:
        problems.load_prompts(tmp_path / "prompts.json")
    pair_id = data["pairs"][1]["id"]
    assert f"pair {pair_id!r}" in str(err.value) and "'42 apples'" in str(err.value)
    assert "write it as a JSON number" in str(err.value)


def test_a_non_numeric_mgsm_answer_names_the_row_and_the_fix(tmp_path):
    en, zh = write_mgsm(tmp_path, answers=("2", "three"))
    with pytest.raises(runs.UsageError, match=r"row 1 \(mgsm-001\).*'three'.*as a number"):
        problems.read_mgsm(en, zh)


# ----------------------------------------------------------------------------------------------
# Flags every script shares: each script refuses them the same way (runs.validate_common)

def a_file(tmp_path):
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "file").write_text("x")
    return "file"


@pytest.mark.parametrize("letter", sorted(SCRIPTS))
@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "0"], "--batch-size 0: pass 1 or more"),
    (["--seed", "-1"], "--seed -1: pass 0 or more"),
    (["--limit", "0"], "--limit 0: pass 1 or more"),
    (["--overwrite", "--resume"], "--overwrite and --resume contradict each other"),
    (["--out", "file"], "--out file: file is a file, not a folder"),
    (["--out", "file/sub"], "--out file/sub: file is a file, not a folder"),
    (["--figures", "file"], "--figures file: file is a file, not a folder"),
    (["--figures", "file/sub"], "--figures file/sub: file is a file, not a folder"),
])
def test_every_script_refuses_a_shared_flag_before_writing(letter, flags, message, tmp_path,
                                                          monkeypatch, capsys):
    a_file(tmp_path)
    out = [] if "--out" in flags else ["--out", "results/x"]
    code, err = exit_of(out + flags, tmp_path, monkeypatch, capsys, SCRIPTS[letter], smoke=True)
    assert code == 2 and message in err


@pytest.mark.parametrize("letter", ["B", "C", "D"])
@pytest.mark.parametrize("cache", ["file", "file/sub"])
def test_a_cache_dir_that_is_a_file_is_refused(letter, cache, tmp_path, monkeypatch, capsys):
    a_file(tmp_path)
    code, err = exit_of(["--out", "out", "--cache-dir", cache], tmp_path, monkeypatch, capsys,
                        SCRIPTS[letter], smoke=True)
    assert code == 2 and f"--cache-dir {cache}: file is a file" in err


@pytest.mark.parametrize("letter", ["A", "E"])
def test_max_new_tokens_0_is_refused(letter, tmp_path, monkeypatch, capsys):
    code, err = exit_of(["--out", "out", "--max-new-tokens", "0"], tmp_path, monkeypatch, capsys,
                        SCRIPTS[letter], smoke=True)
    assert code == 2 and "--max-new-tokens 0: pass 1 or more" in err


@pytest.mark.parametrize("letter", sorted(SCRIPTS))
def test_figures_outside_the_checkout_are_checked_too(letter, tmp_path, monkeypatch, capsys):
    """An --out outside the checkout keeps its figures beside it (runs.figure_dir), but a
    --figures that names a file is still a mistake, refused before the run rather than ignored."""
    a_file(tmp_path)
    code, err = exit_of(["--out", tmp_path / "outside", "--figures", "file"], tmp_path,
                        monkeypatch, capsys, SCRIPTS[letter], smoke=True)
    assert code == 2 and "--figures file" in err and not (tmp_path / "outside").exists()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc, where no folder can be made")
@pytest.mark.parametrize("letter", sorted(SCRIPTS))
def test_an_out_that_cannot_be_created_is_refused(letter, tmp_path, monkeypatch, capsys):
    code, err = exit_of(["--out", "/proc/no-such-run/exp"], tmp_path, monkeypatch, capsys,
                        SCRIPTS[letter], smoke=True)
    assert code == 2 and "--out /proc/no-such-run/exp: cannot create folders in /proc" in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into a read-only folder")
def test_an_out_under_a_read_only_folder_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "locked").mkdir(mode=0o555)
    code, err = exit_of(["--out", "locked/exp_b"], tmp_path, monkeypatch, capsys, smoke=True)
    assert code == 2 and "cannot create folders in locked" in err


def test_a_plain_file_as_out_is_a_usage_error_not_a_traceback(tmp_path, monkeypatch, capsys):
    a_file(tmp_path)
    code, err = exit_of(["--out", "file"], tmp_path, monkeypatch, capsys, A)  # A, no --smoke
    assert code == 2 and "--out file: file is a file, not a folder; pass a folder path" in err


@pytest.mark.parametrize("letter", sorted(SCRIPTS))
def test_a_folder_given_as_the_prompts_file_is_named_a_folder(letter, tmp_path, monkeypatch,
                                                             capsys):
    (tmp_path / "run" / "prompts").mkdir(parents=True)
    code, err = exit_of(["--out", "out", "--prompts", "prompts"], tmp_path, monkeypatch, capsys,
                        SCRIPTS[letter], smoke=True)
    assert code == 2 and "--prompts prompts is a folder; pass a prompts.json-style file" in err


def test_a_folder_given_as_an_mgsm_file_is_named_a_folder(tmp_path, monkeypatch, capsys):
    en, zh = write_mgsm(tmp_path)
    (tmp_path / "run" / "mgsm").mkdir(parents=True)
    code, err = exit_of(["--out", "out", "--prompts-en", en, "--prompts-zh", "mgsm"], tmp_path,
                        monkeypatch, capsys, smoke=True)
    assert code == 2 and "--prompts-zh mgsm is a folder; pass the mgsm_zh.tsv file in it" in err


def test_fewer_scored_draws_than_decoded_ones_is_refused(tmp_path, monkeypatch, capsys):
    """--n-random-logprob counts every scored draw of random Z, the decoded ones among them: a
    config.json saying 1 while the summary ranked against 3 is what this refuses."""
    code, err = exit_of(["--out", "out", "--n-random", "3", "--n-random-logprob", "1"], tmp_path,
                        monkeypatch, capsys, A, smoke=True)
    assert code == 2 and "pass --n-random-logprob 3 or more" in err


@pytest.mark.parametrize("letter", sorted(SCRIPTS))
def test_resume_on_another_scripts_run_names_that_script(letter, tmp_path, monkeypatch, capsys):
    other = "exp_b_residual.py" if letter != "B" else "exp_d_bridge.py"
    run = tmp_path / "run" / "out"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"script": other, "args": {"k": [8]}}))
    code, err = exit_of(["--out", "out", "--resume"], tmp_path, monkeypatch, capsys,
                        SCRIPTS[letter], smoke=True)
    mine = f"{SCRIPTS[letter].__name__}.py"
    assert code == 2 and f"was made by {other}, not {mine}" in err and "(was" not in err


def test_report_out_under_a_file_is_refused(tmp_path, monkeypatch, capsys):
    a_file(tmp_path)
    (tmp_path / "run" / "results").mkdir()
    code, err = exit_of(["--results", "results", "--out", "file/report/REPORT.md"], tmp_path,
                        monkeypatch, capsys, report)
    assert code == 2 and "--out file/report/REPORT.md: file is a file, not a folder" in err


def test_report_out_that_is_a_folder_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "run" / "results").mkdir(parents=True)
    code, err = exit_of(["--results", "results", "--out", "results"], tmp_path, monkeypatch,
                        capsys, report)
    assert code == 2 and "--out results is a folder; pass a file path" in err


@pytest.mark.parametrize("flags,message", [
    (["--limit", "0"], "--limit 0: pass 1 or more"),
    (["--pairs", "0"], "--limit 0: pass 1 or more"),  # the older name of --limit
    (["--limit", "1"], "--limit 1: pass 2 to"),
    (["--new-tokens", "0"], "--new-tokens 0: pass 1 or more"),
    (["--out", "file/bench.csv"], "--out file/bench.csv: file is a file"),
])
def test_bench_refuses_counts_below_one_instead_of_its_default(flags, message, tmp_path,
                                                               monkeypatch, capsys):
    """--limit 0 (then --pairs 0) ran the default 6 pairs: 0 was read as 'not given'."""
    a_file(tmp_path)
    argv = ["--shape", "tiny", "--device", "cpu", "--parts", "b", "--out", "bench.csv", *flags]
    monkeypatch.chdir(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        runs.run_cli(bench.main, bench.parse_args(argv))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and "\n" not in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["file"]


# ----------------------------------------------------------------------------------------------
# study.py: its own flags, and each experiment's checked before the first one runs

def study_exit_of(argv, tmp_path, monkeypatch, capsys):
    return exit_of(argv, tmp_path, monkeypatch, capsys, study)


@pytest.mark.parametrize("flags,message", [
    (["--seed", "-1"], "--seed -1: pass 0 or more"),
    (["--out", "file/study"], "--out file/study: file is a file"),
])
def test_study_refuses_bad_flags_before_any_experiment_runs(flags, message, tmp_path,
                                                            monkeypatch, capsys):
    a_file(tmp_path)
    out = [] if "--out" in flags else ["--out", "study"]
    code, err = study_exit_of(out + flags, tmp_path, monkeypatch, capsys)
    assert code == 2 and message in err


def test_study_refuses_an_out_of_unrelated_files(tmp_path, monkeypatch, capsys):
    (tmp_path / "run" / "mine").mkdir(parents=True)
    (tmp_path / "run" / "mine" / "notes.txt").write_text("mine")
    for flags in ([], ["--overwrite"]):
        code, err = study_exit_of(["--out", "mine", *flags], tmp_path, monkeypatch, capsys)
        assert code == 2 and "notes.txt" in err and "new --out" in err
    assert (tmp_path / "run" / "mine" / "notes.txt").read_text() == "mine"


def test_study_refuses_an_experiment_folder_of_unrelated_files(tmp_path, monkeypatch, capsys):
    """exp_d/ holding someone's files would stop the study after A, B and C ran: refused first."""
    (tmp_path / "run" / "s" / "exp_d").mkdir(parents=True)
    (tmp_path / "run" / "s" / "exp_d" / "notes.txt").write_text("mine")
    code, err = study_exit_of(["--out", "s"], tmp_path, monkeypatch, capsys)
    assert code == 2 and err.startswith("error: D (exp_d_bridge.py):") and "new --out" in err
