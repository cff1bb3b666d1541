"""Problem files a user gets wrong: swapped MGSM files, an empty file, a non-numeric answer. Each
is one line naming the fix (exit 2 from a script) and nothing is written."""
import json

import pytest

import exp_b_residual as B
from zcausal import problems, runs


def write_mgsm(folder, en_questions=("Tom has 2 apples. How many?", "A bus has 3 seats. How many?"),
               zh_questions=("小明有2个苹果。一共有多少个？", "公交车有3个座位。一共有多少个？"),
               answers=("2", "3")):
    for lang, questions in (("en", en_questions), ("zh", zh_questions)):
        (folder / f"mgsm_{lang}.tsv").write_text(
            "".join(f"{q}\t{a}\n" for q, a in zip(questions, answers)), encoding="utf-8")
    return folder / "mgsm_en.tsv", folder / "mgsm_zh.tsv"


def exit_of(argv, tmp_path, monkeypatch, capsys):
    """(exit status, stderr) of exp_b_residual.py with `argv`, run in tmp_path/run."""
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        runs.run_cli(B.main, B.parse_args(["--model", "tiny-random", *map(str, argv)]))
    assert list((tmp_path / "run").iterdir()) == []  # nothing written
    return exit_info.value.code, capsys.readouterr().err.strip()


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
