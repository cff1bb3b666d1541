"""Experiment C, the script: layers and depth, the token clouds (numbers, shared prefixes), the
selection, an end-to-end run, --replot, and an interrupted run resumed to the same result."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from zcausal import ard_mmd as A, problems, runs
import common
import exp_c_ard_mmd as C
import synthetic_numbers


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


def test_default_layers_are_the_plans_at_the_same_depth():
    from transformers import Qwen2Config
    for n, expected in ((36, C.PLAN_LAYERS), (24, [7, 10, 13, 17, 19, 20, 21, 22, 23]),
                        (28, [8, 12, 16, 19, 22, 23, 25, 26, 27])):
        args = C.parse_args(["--model", "x"])
        assert C.resolve_layers(args, Qwen2Config(num_hidden_layers=n)) == (expected, expected[6]
                                                                           if n != 36 else 32)
    args = C.parse_args(["--model", "x", "--layer-depths", "0.5", "0.889", "--depth", "0.5"])
    assert C.resolve_layers(args, Qwen2Config(num_hidden_layers=28)) == ([14, 25], 14)


def test_summarise_fit_counts_the_coordinates_below_l_ref():
    log_l = torch.log(torch.tensor([1.0, 2.0, 5.0, 50.0, 500.0]))
    row = C.summarise_fit(log_l, math.log(10.0), torch.tensor([1.0, 0.5, 0.2, 0.1, 0.0]))
    assert row["z_size"] == 3 and row["z_size_rel"] == 2 and row["overlap"] == 3  # w = 1, 1/4


def test_warm_start_puts_the_svd_masks_top_k_coordinates_inside_z():
    z_energy = torch.tensor([0.9, 0.02, 0.5, 0.001, 0.3, 0.05, 0.0, 0.2])
    log_l = C.initial_log_l("warm", z_energy, 40.0, 1e-3, k=3)
    assert set(np.flatnonzero((log_l < math.log(40.0)).numpy())) == {0, 2, 4}  # the top 3
    # the plan's shape: log l_j = -log(diag + eps) up to one shift
    shift = log_l + torch.log(z_energy + 1e-3)
    torch.testing.assert_close(shift, torch.full_like(shift, float(shift[0])))
    cold = C.initial_log_l("cold", z_energy, 40.0, 1e-3, k=3)
    torch.testing.assert_close(cold, torch.full_like(cold, math.log(40.0)))


def test_mark_selected_takes_the_lowest_validation_cross_entropy_ties_to_the_larger_lambda():
    summary = pd.DataFrame({"layer": 1, "objective": "contrastive", "start": "cold",
                            "lambda": [0.0, 0.1, 1.0, 10.0], "ce_val_final": [0.9, 0.5, 0.5, 2.0]})
    assert C.mark_selected(summary)["selected"].tolist() == [False, False, True, False]


def test_only_the_numbers_shared_retrieval_perfect_with_them_and_at_chance_without(tiny,
                                                                                  monkeypatch):
    """Synthetic clouds (tests/synthetic_numbers.py) in which the zh and en versions of a problem
    share only their number position: with the numbers, MMD retrieval finds every partner; with
    --drop-numbers the clouds of all problems are identical, and retrieval is at chance (1/N)."""
    n = synthetic_numbers.N_PROBLEMS
    for drop, expected in ((False, 1.0), (True, 1 / n)):
        states = synthetic_numbers.activations(tiny, monkeypatch, drop, pool=None)
        zh, en = ([s[:, 0].float() for s in half] for half in (states[:n], states[n:]))
        acc, ce = A.evaluate_retrieval(A.make_clouds(*A.pad_clouds(zh)),
                                       A.make_clouds(*A.pad_clouds(en)), torch.zeros(1, 64))
        assert acc[0] == pytest.approx(expected), drop
        if drop:
            assert ce[0] == pytest.approx(math.log(n))  # chance cross-entropy
        else:
            assert ce[0] < math.log(n) - 0.1


def test_clouds_leave_out_the_shared_prefix_and_the_numbers(tiny):
    model, tokenizer = tiny
    pairs = [{"id": "a", "zh": "Tom 有12个苹果。", "en": "Tom has 12 apples.", "answer": 12},
             {"id": "b", "zh": "小明有3个梨。", "en": "Anna has 3 pears.", "answer": 3}]
    args = C.parse_args(["--model", "x", "--cache-dir", "none"])
    zh, en, shared = C.load_clouds(model, tokenizer, pairs, [1], args)
    ids = [tokenizer(p[lang], add_special_tokens=False)["input_ids"] for p in pairs
           for lang in ("zh", "en")]
    prefix = C.shared_prefix_len(ids[0], ids[1])
    assert shared == 1 and prefix >= 2  # "Tom" and the space: more than the first token
    assert [len(c) for c in zh] == [len(ids[0]) - prefix, len(ids[2]) - 1]
    args.drop_numbers = True
    zh_d, en_d, _ = C.load_clouds(model, tokenizer, pairs, [1], args)
    for cloud, dropped, text in ((zh_d[0], zh[0], pairs[0]["zh"]), (en_d[1], en[1], pairs[1]["en"])):
        numbers = int(common.number_token_mask(tokenizer, text).sum())
        assert numbers >= 1 and len(cloud) == len(dropped) - numbers


# --------------------------------------------------------------------------------------------
# The script

@pytest.fixture
def prompts_file(tmp_path):
    pairs = json.loads(problems.DEFAULT_PROMPTS.read_text(encoding="utf-8"))["pairs"][:8]
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"templates": {"cot": {"en": "Q: {question}", "zh": "问：{question}"}},
                                "pairs": pairs}, ensure_ascii=False), encoding="utf-8")
    return path


def _argv(tmp_path, prompts_file, *extra):
    return ["--model", common.TINY_MODEL, "--prompts", str(prompts_file),
            "--out", str(tmp_path / "out"), "--figures", str(tmp_path / "fig"),
            "--cache-dir", str(tmp_path / "cache"), *extra]


@pytest.mark.parametrize("bad,message", [
    (["--layers", "1", "9"], "pass --layers between 0 and 3"),
    (["--basis-layer", "4"], "pass --basis-layer between 0 and 3"),
    (["--layer-depths", "0.5", "1.0"], "--layer-depths 1.0 is not a fraction"),
    (["--depth", "0"], "--depth 0.0 is not a fraction"),
    (["--layers", "1", "--layer-depths", "0.5"], "not both"),
    (["--k", "0"], "pass --k between 1 and 64"), (["--k", "65"], "pass --k between 1 and 64"),
    (["--lambdas", "0.1", "0.1"], "distinct"), (["--device", "cuda"], "no CUDA device")])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, prompts_file, bad, message, capsys):
    if bad[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exc:
        runs.run_cli(C.main, C.parse_args(_argv(tmp_path, prompts_file, *bad)))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err
    assert not any((tmp_path / name).exists() for name in ("out", "fig", "cache"))


FAST = ["--layers", "1", "3", "--steps", "10", "--min-steps", "0", "--lambdas", "0", "0.1", "10",
        "--basis-layer", "2", "--k", "8"]


def test_main_end_to_end(tmp_path, prompts_file, monkeypatch):
    args = C.parse_args(_argv(tmp_path, prompts_file, *FAST, "--objective", "contrastive", "plan"))
    summary = C.main(args)
    out = tmp_path / "out"
    assert len(summary) == 2 * 2 * 2 * 3 and summary["selected"].sum() == 2 * 2 * 2
    npz = np.load(out / "lengthscales.npz")
    assert npz["log10_l"].shape == (2, 2, 2, 3, 64) and np.isfinite(npz["log10_l"]).all()
    assert npz["z_energy"].sum() == pytest.approx(8, rel=1e-4)
    traces = pd.read_csv(out / "traces.csv")
    assert list(traces.columns[:6]) == ["layer", "objective", "start", "lambda", "step", "loss"]
    assert traces["step"].max() == 10 and len(traces) == 2 * 2 * 2 * 3 * 2
    assert sorted(p.name for p in (out / "fits").iterdir()) == [
        "layer001_contrastive.npz", "layer001_plan.npz", "layer003_contrastive.npz",
        "layer003_plan.npz"]
    config = json.loads((out / "config.json").read_text())
    assert config["layers"] == [1, 3] and config["basis_layer"] == 2 and config["depth"] is None
    assert set(config["splits"]) == {"train", "val", "test"} and config["drop_numbers"] is False
    assert config["tokens"]["number_tokens"] > 0
    figures = runs.figure_dir(out, tmp_path / "fig")
    for name in ("z_size", "spectrum", "overlap", "traces"):
        assert (figures / f"{name}.png").stat().st_size > 10_000
    assert summary["retrieval_test_final"].between(0, 1).all()
    # the contrastive penalty at the cold start is lambda * 2N (N training problems)
    cold = summary[(summary.objective == "contrastive") & (summary.start == "cold")
                   & (summary.layer == 1)]
    n_train = len(config["splits"]["train"])
    first = traces[(traces.objective == "contrastive") & (traces.start == "cold")
                   & (traces.step == 0) & (traces.layer == 1)].set_index("lambda")["penalty"]
    np.testing.assert_allclose(first.loc[cold["lambda"]], cold["lambda"] * 2 * n_train, rtol=1e-5)

    for name in ("z_size", "traces"):
        (figures / f"{name}.png").unlink()
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    C.main(C.parse_args(_argv(tmp_path, prompts_file, "--replot")))
    assert (figures / "z_size.png").is_file() and (figures / "traces.png").is_file()


def test_an_interrupted_run_resumes_to_the_same_results(tmp_path, prompts_file, monkeypatch,
                                                        capsys):
    """Ctrl-C after the first (layer, objective) batch: exit 130 with one line, the finished batch
    on disk; --resume with other flags is refused; --resume with the same flags skips the finished
    batch and ends with the files of an uninterrupted run."""
    whole = tmp_path / "whole"
    C.main(C.parse_args(_argv(tmp_path, prompts_file, *FAST) + ["--out", str(whole)]))
    real_fit, calls = C.compute_layer_fits, []

    def interrupted_after_one(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(C, "compute_layer_fits", interrupted_after_one)
    with pytest.raises(SystemExit) as exc:
        runs.run_cli(C.main, C.parse_args(_argv(tmp_path, prompts_file, *FAST)))
    assert exc.value.code == 130 and "--resume" in capsys.readouterr().err
    out = tmp_path / "out"
    assert [p.name for p in (out / "fits").iterdir()] == ["layer001_contrastive.npz"]
    assert not (out / "summary.csv").exists()

    with pytest.raises(SystemExit) as exc:
        runs.run_cli(C.main, C.parse_args(_argv(tmp_path, prompts_file, *FAST, "--resume",
                                                "--steps", "12")))
    assert exc.value.code == 2 and "--steps" in capsys.readouterr().err

    calls.clear()
    monkeypatch.setattr(C, "compute_layer_fits", lambda *a, **k: calls.append(a[1]) or real_fit(*a, **k))
    C.main(C.parse_args(_argv(tmp_path, prompts_file, *FAST, "--resume")))
    assert calls == [3]  # only the unfinished layer was fitted
    for name in ("summary.csv", "traces.csv"):
        assert (out / name).read_text() == (whole / name).read_text(), name
    for key, value in np.load(whole / "lengthscales.npz").items():
        np.testing.assert_array_equal(np.load(out / "lengthscales.npz")[key], value)
