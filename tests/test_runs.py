"""Run bookkeeping shared by every script: exits, output folders, resume checks, figure paths,
portable paths in config.json, depth-matched layers and the runtime checks."""
import argparse
import json
import signal
import sys
from pathlib import Path

import pytest
import torch

import common
from zcausal import runs


def _exit_of(fn, capsys):
    with pytest.raises(SystemExit) as info:
        runs.run_cli(fn, argparse.Namespace(out=Path("results/x")))
    return info.value.code, capsys.readouterr().err.strip()


def test_ctrl_c_and_sigterm_end_with_one_line_and_their_exit_codes(capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    def terminated(args):
        signal.raise_signal(signal.SIGTERM)

    for fn, expected in ((interrupted, 130), (terminated, 143)):
        code, err = _exit_of(fn, capsys)
        assert code == expected
        assert "\n" not in err and "--resume" in err and "results/x" in err
    assert signal.getsignal(signal.SIGTERM) is not runs._raise_terminated  # handler restored


def test_usage_error_is_one_line_and_exit_2(capsys):
    def bad(args):
        raise runs.UsageError("pass --k between 1 and 4")

    code, err = _exit_of(bad, capsys)
    assert code == 2 and err == "error: pass --k between 1 and 4"


def test_out_that_is_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(runs.UsageError, match="is a file"):
            runs.prepare_out_dir(out)


def test_overwrite_removes_every_file_of_the_earlier_run_and_its_figures(tmp_path):
    out, figures = tmp_path / "run", tmp_path / "fig"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "stale.csv").write_text("x")
    fig_dir = runs.figure_dir(out, figures)
    fig_dir.mkdir(parents=True)
    (fig_dir / "old.png").write_text("x")
    with pytest.raises(runs.UsageError, match="--resume"):
        runs.prepare_out_dir(out)
    runs.prepare_out_dir(out, overwrite=True, figures=figures)
    assert out.is_dir() and not any(out.iterdir()) and not any(fig_dir.iterdir())


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(runs.UsageError, match="not a run"):
        runs.prepare_out_dir(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_needs_a_run_with_the_same_flags(tmp_path):
    args = argparse.Namespace(k=[20], out=tmp_path, batch_size=8, resume=True)
    with pytest.raises(runs.UsageError, match="no run to continue"):
        runs.prepare_out_dir(tmp_path, resume=True, args=args)
    runs.write_json(tmp_path / "config.json", runs.run_config(
        argparse.Namespace(k=[20], out=tmp_path, batch_size=64, resume=False)))
    assert runs.prepare_out_dir(tmp_path, resume=True, args=args) == tmp_path  # batch size ignored
    with pytest.raises(runs.UsageError, match="--k"):
        runs.prepare_out_dir(tmp_path, resume=True, args=argparse.Namespace(
            k=[50], out=tmp_path, batch_size=8, resume=True))


def test_two_runs_with_the_same_basename_get_different_figure_folders(tmp_path):
    a = runs.figure_dir(tmp_path / "r1" / "exp_a", tmp_path / "fig")
    b = runs.figure_dir(tmp_path / "r2" / "exp_a", tmp_path / "fig")
    assert a != b and a.parent.parent != a
    inside = runs.figure_dir(runs.REPO / "results" / "example-m" / "exp_a", runs.REPO / "figures")
    assert inside == runs.REPO / "figures" / "example-m" / "exp_a"


def test_a_run_outside_the_checkout_keeps_its_figures_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(runs.REPO)  # the default --figures: the checkout's figures/
    assert runs.figure_dir("results/r1/exp_a", runs.DEFAULT_FIGURES) == Path("figures/r1/exp_a")
    assert runs.figure_dir(tmp_path / "r1", runs.DEFAULT_FIGURES) == tmp_path / "r1" / "figures"


def test_config_holds_no_absolute_path_of_this_machine(tmp_path, monkeypatch):
    # as if this file were the script run from the command line (run_config names its caller)
    monkeypatch.setattr(sys, "argv", [__file__, "--model", str(Path.home() / "m"),
                                      "--out", str(runs.REPO / "results" / "x")])
    args = argparse.Namespace(model=str(Path.home() / "m"), out=runs.REPO / "results" / "x",
                              prompts_en=Path("/data/elsewhere/mgsm_en.tsv"))
    config = runs.run_config(args)
    text = json.dumps(config)
    assert str(runs.REPO) not in text and str(Path.home()) + "/" not in text
    assert config["args"]["model"] == "~/m" and config["args"]["out"] == "results/x"
    assert config["args"]["prompts_en"] == "<outside>/mgsm_en.tsv"
    assert config["command"] == "test_runs.py --model ~/m --out results/x"
    assert config["script"] == "test_runs.py"


def test_config_of_a_main_called_from_python_has_no_command(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest", "-q"])
    config = runs.run_config(argparse.Namespace(out=Path("results/x")))
    assert config["script"] == "test_runs.py" and config["command"] is None


@pytest.mark.parametrize("n_layers, layer", [(24, 21), (28, 25), (36, 32)])
def test_depth_resolves_to_the_same_relative_layer(n_layers, layer):
    config = argparse.Namespace(num_hidden_layers=n_layers)
    assert common.depth_to_layer(config, 0.889) == layer


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 1.2])
def test_depth_outside_the_unit_interval_is_a_usage_error(fraction):
    with pytest.raises(runs.UsageError, match="--depth"):
        common.depth_to_layer(argparse.Namespace(num_hidden_layers=24), fraction)


def test_layer_error_names_the_scripts_own_flag():
    config = argparse.Namespace(num_hidden_layers=4)
    with pytest.raises(runs.UsageError, match="--basis-layer"):
        common.check_layer(config, 7, flag="--basis-layer")


def test_k_equal_to_d_is_refused_where_a_complement_is_needed():
    config = argparse.Namespace(hidden_size=64)
    assert common.check_k(config, 64) == 64
    with pytest.raises(runs.UsageError, match="Z-perp empty"):
        common.check_k(config, 64, allow_full=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
@pytest.mark.parametrize("device", ["cuda", "gpu", "cuda:0"])
def test_cuda_asked_for_without_cuda_is_a_usage_error(device):
    with pytest.raises(runs.UsageError, match="--device cpu"):
        common.check_runtime(device, None)


def test_unknown_device_is_a_usage_error_and_float16_on_cpu_warns():
    with pytest.raises(runs.UsageError, match="unknown device"):
        common.check_runtime("tpu7", None)
    with pytest.warns(UserWarning, match="emulated"):
        common.check_runtime("cpu", "float16")


def test_cache_dir_none_means_off():
    assert common.cache_dir_arg("none") is None and common.cache_dir_arg("None") is None
    assert common.cache_dir_arg("x/y") == Path("x/y")



def test_resume_reads_a_config_written_under_the_old_flag_names(tmp_path):
    """Runs made before the rename store basis_layer (B, C, E), one value for --layer (D) and
    --depth (B-E), and no entry for flags added since: --resume compares them under today's names,
    as the lists the flags now give, and skips what the run could not have set."""
    for old, now in (({"basis_layer": 21, "depth": 0.889}, {"layer": 21, "depth": [0.889]}),
                     ({"basis_layer": None, "depth": 0.889}, {"layer": None, "depth": [0.889]}),
                     ({"layer": 21, "depth": None}, {"layer": [21], "depth": None}),
                     ({"layer": [21, 22], "depth": None}, {"layer": [21, 22], "depth": None})):
        runs.write_json(tmp_path / "config.json", {"args": dict(old, k=50)})
        runs.check_resume(tmp_path, argparse.Namespace(**now, k=[50], bank_steps=1))
        for changed in ({"layer": [3]}, {"k": [20]}, {"depth": [0.5]}):
            with pytest.raises(runs.UsageError, match=f"--{next(iter(changed))} "):
                runs.check_resume(tmp_path, argparse.Namespace(**{**now, "k": [50], **changed}))


# Defaults that changed after the committed runs were made (--n-random was 20 in B and D, E's
# --das-k 20 50) or flags added since (A's and E's --site: such runs patched the output): a
# command that continues one names their values, as check_resume's message asks.
CHANGED_SINCE = {"n_random": None, "das_k": None, "site": "output"}


@pytest.mark.parametrize("config", sorted(runs.REPO.glob("results/example-*/exp_*/config.json")),
                         ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_a_committed_run_resumes_with_its_own_command(config, monkeypatch):
    """Each committed run's command, parsed and validated by today's script (the model's config
    stood in for by its layer count and width), passes --resume's check (CHANGED_SINCE named)."""
    import importlib
    stored = json.loads(config.read_text(encoding="utf-8"))
    model = common.tiny_config()
    model.num_hidden_layers, model.hidden_size = (stored["model"]["num_layers"],
                                                  stored["model"]["hidden_size"])
    monkeypatch.setattr(common, "load_model_config", lambda *a, **k: model)
    words = stored["command"].split()
    script = importlib.import_module(Path(words[0]).stem)
    argv = words[1:] + ["--resume"]
    for key, before in CHANGED_SINCE.items():
        value = stored["args"].get(key, before)
        if value is not None and hasattr(script.parse_args(words[1:]), key):
            argv += [f"--{key.replace('_', '-')}",
                     *map(str, value if isinstance(value, list) else [value])]
    args = script.parse_args(argv)
    if hasattr(script, "build_parser"):  # A and E resolve their flags in validate, before the check
        script.validate(args)
    runs.check_resume(config.parent, args)


def test_write_csv_keeps_a_file_that_holds_the_same_table(tmp_path):
    """A table whose numbers moved only in their last digits (another pandas or numpy) leaves the
    file's bytes alone; a real change, a new column or other text rewrites it."""
    import pandas as pd
    path = tmp_path / "t.csv"
    table = pd.DataFrame({"name": ["a", "b"], "x": [0.1234567890123, 2.0], "n": [1, 2],
                          "flag": [True, False], "p": [float("nan"), 1e-300]})
    runs.write_csv(table, path)
    before = path.read_bytes()
    runs.write_csv(table.assign(x=table.x * (1 + 1e-13)), path)
    assert path.read_bytes() == before
    for changed in (table.assign(x=table.x * (1 + 1e-6)), table.assign(name=["a", "c"]),
                    table.assign(extra=1), table.iloc[:1], table.assign(p=[0.5, 1e-300])):
        runs.write_csv(table, path)
        runs.write_csv(changed, path)
        assert runs.load_csv(path).shape == changed.shape and path.read_bytes() != before


def test_save_figure_keeps_a_file_that_shows_the_same_pixels(tmp_path):
    """Only the PNG's metadata differs (another matplotlib writes its version there): kept."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def figure(y):
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [0, y])
        return fig

    path = tmp_path / "f.png"
    fig = figure(1)
    fig.tight_layout()
    fig.savefig(path, dpi=50, metadata={"Software": "another version"})
    plt.close(fig)
    before = path.read_bytes()
    runs.save_figure(figure(1), path, dpi=50)
    assert path.read_bytes() == before
    runs.save_figure(figure(2), path, dpi=50)
    assert path.read_bytes() != before and b"another version" not in path.read_bytes()
