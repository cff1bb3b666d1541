"""What B, C and D share on the command line: the README smoke commands run end to end, --depth
resolves to the same depth on every model, bad input is one line with exit 2 and creates nothing,
--cache-dir none is off, and --resume continues an interrupted run (and is checked, not ignored)."""
import json
import shlex

import pytest
import torch

import common
from zcausal import runs
import exp_b_residual as B
import exp_c_ard_mmd as C
import exp_d_bridge as D
from helpers import SMOKE_COMMANDS

SCRIPTS = {"B": B, "C": C, "D": D}
OUTPUTS = {"B": ["per_prompt.csv", "per_layer.csv", "asymmetry.csv", "random_draws.csv"],
           "C": ["summary.csv", "traces.csv", "lengthscales.npz"],
           "D": ["metrics.csv", "singular_values.csv", "null.csv"]}
FIGURES = {"B": ["residual_ratio"], "C": ["z_size", "spectrum", "overlap", "traces"],
           "D": ["singular_values", "heldout_r2"]}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


# Lighter still, for the tests that are not about the README command itself.
LIGHT = {"B": ["--n-random", "5"], "C": [], "D": ["--k", "8", "--n-shuffles", "10"]}


def smoke_args(name, *extra, light=True):
    return SCRIPTS[name].parse_args(shlex.split(SMOKE_COMMANDS[name])[2:]
                                    + (LIGHT[name] if light else []) + list(extra))


def exit_of(name, args, capsys):
    with pytest.raises(SystemExit) as info:
        runs.run_cli(SCRIPTS[name].main, args)
    return info.value.code, capsys.readouterr().err.strip()


def config_of(n_layers):
    from transformers import Qwen2Config
    return Qwen2Config(num_hidden_layers=n_layers, hidden_size=64, num_attention_heads=4,
                       num_key_value_heads=2)


def resolved_layer(name, args):
    """The layer of Z (B and C) or of the bridge (D) that the script's validation resolves."""
    return SCRIPTS[name].validate(args)[-1]


# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["B", "C", "D"])
def test_readme_smoke_command_runs_end_to_end(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out, --figures and --cache-dir are relative
    args = smoke_args(name, light=False)
    SCRIPTS[name].main(args)
    out = tmp_path / "results" / f"exp_{name.lower()}"
    for file in OUTPUTS[name] + ["config.json"]:
        assert (out / file).stat().st_size > 0, file
    for figure in FIGURES[name]:
        assert runs.figure_path(args, figure).stat().st_size > 10_000, figure
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["model"] == common.TINY_MODEL and "model" in config
    assert list((tmp_path / "results" / "cache").glob("acts-*.pt"))  # the default cache


@pytest.mark.parametrize("name", ["B", "C", "D"])
def test_depth_means_the_same_depth_on_every_model(name, monkeypatch):
    for n_layers, expected in ((24, 21), (28, 25), (36, 32)):
        monkeypatch.setattr(common, "load_model_config", lambda *a, n=n_layers, **k: config_of(n))
        assert resolved_layer(name, SCRIPTS[name].parse_args(
            ["--model", "x", "--depth", "0.889"])) == expected
        # the default is the plan's layer 32 of 36 at the same depth
        assert resolved_layer(name, SCRIPTS[name].parse_args(["--model", "x"])) == expected


@pytest.mark.parametrize("name", ["B", "C", "D"])
def test_config_records_the_fraction_and_the_layer(name, tmp_path):
    args = smoke_args(name, "--depth", "0.5", "--out", str(tmp_path / "out"),
                      "--figures", str(tmp_path / "fig"), "--cache-dir", "none")
    SCRIPTS[name].main(args)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    layer_key = "layer" if name == "D" else "basis_layer"
    assert config["depth"] == [0.5] and config[layer_key] == 2 and config["args"]["depth"] == [0.5]
    assert config[f"{layer_key}_fraction"] == 0.5


BAD = [(["--depth", "0"], "--depth 0.0 is not a fraction"),
       (["--depth", "1"], "--depth 1.0 is not a fraction"),
       (["--depth", "-0.2"], "is not a fraction"),
       (["--depth", "0.5", "--layer", "1"], "not both"),
       (["--layer", "9"], "pass --layer between 0 and 3"),
       (["--layer", "1", "2"], "run it once per layer"),
       (["--depth", "0.3", "0.5"], "run it once per layer"),
       (["--device", "cuda"], "no CUDA device"),
       (["--prompts", "MISSING.json"], "MISSING.json")]


@pytest.mark.parametrize("name", ["B", "C", "D"])
@pytest.mark.parametrize("extra,message", BAD)
def test_bad_input_is_one_line_exit_2_and_creates_nothing(name, extra, message, tmp_path,
                                                          monkeypatch, capsys):
    if "--device" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    code, err = exit_of(name, smoke_args(name, *extra), capsys)
    assert code == 2 and err.startswith("error:") and "\n" not in err and message in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,why", [("B", "Z-perp"), ("C", "every coordinate in the SVD mask"),
                                      ("D", "Z the whole space")])
def test_k_equal_to_d_is_refused_with_the_scripts_own_reason(name, why, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.chdir(tmp_path)
    code, err = exit_of(name, smoke_args(name, "--k", "64"), capsys)
    assert code == 2 and why in err and "pass --k between 1 and 63" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["B", "C", "D"])
def test_smoke_presets_the_flags_left_at_their_default(name):
    script = SCRIPTS[name]
    args = script.parse_args(["--model", "tiny-random", "--smoke"])
    for flag, value in script.SMOKE.items():
        assert getattr(args, flag) == value, flag
    assert script.parse_args(["--model", "tiny-random", "--smoke", "--limit", "9"]).limit == 9


@pytest.mark.parametrize("name", ["B", "D"])
def test_smoke_runs_and_replot_says_what_it_wrote(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    SCRIPTS[name].main(SCRIPTS[name].parse_args(["--model", "tiny-random", "--smoke",
                                                 "--cache-dir", "none"]))
    capsys.readouterr()
    paths = SCRIPTS[name].main(SCRIPTS[name].parse_args(["--model", "tiny-random", "--replot"]))
    printed = capsys.readouterr().out
    for figure in FIGURES[name]:
        assert f"figures/exp_{name.lower()}/{figure}.png" in printed
    assert printed.splitlines()[-1].startswith("wrote") and len(paths) == len(FIGURES[name])


@pytest.mark.parametrize("name", ["B", "C", "D"])
def test_replot_of_a_missing_run_is_one_line_and_writes_nothing(name, tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.chdir(tmp_path)
    code, err = exit_of(name, SCRIPTS[name].parse_args(["--model", "tiny-random", "--replot",
                                                        "--out", "nowhere"]), capsys)
    assert code == 2 and "does not exist" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["B", "C", "D"])
def test_cache_dir_none_writes_no_cache(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = smoke_args(name, "--cache-dir", "none")
    assert args.cache_dir is None
    SCRIPTS[name].main(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures", "results"]
    assert [p.name for p in (tmp_path / "results").iterdir()] == [f"exp_{name.lower()}"]


@pytest.mark.parametrize("name", ["B", "D"])
def test_resume_is_checked_and_continues_an_interrupted_run(name, tmp_path, monkeypatch, capsys):
    """B and D cache their extraction, so --resume recomputes; but it must find a run with the
    same flags, and an interrupted run (Ctrl-C during the extraction) must be resumable."""
    monkeypatch.chdir(tmp_path)
    whole = smoke_args(name, "--out", "whole")
    SCRIPTS[name].main(whole)
    real_extract = common.extract_activations

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "extract_activations", interrupted)
    code, err = exit_of(name, smoke_args(name), capsys)
    assert code == 130 and "--resume" in err
    out = tmp_path / "results" / f"exp_{name.lower()}"
    assert (out / "config.json").is_file()  # written first, so the run can be resumed
    monkeypatch.setattr(common, "extract_activations", real_extract)

    code, err = exit_of(name, smoke_args(name), capsys)
    assert code == 2 and "--resume" in err and "--overwrite" in err
    code, err = exit_of(name, smoke_args(name, "--resume", "--seed", "1"), capsys)
    assert code == 2 and "--seed (was 0, now 1)" in err

    SCRIPTS[name].main(smoke_args(name, "--resume"))
    for file in OUTPUTS[name]:
        assert (out / file).read_bytes() == (tmp_path / "whole" / file).read_bytes(), file
