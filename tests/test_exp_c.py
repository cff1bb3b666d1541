"""Experiment C, the script: layers and depth, the token clouds (numbers, shared prefixes), the
selection, several k (a warm start and overlap rows per k, the cold start fitted once, on a planted
case and end to end), --replot, and an interrupted run resumed to the same result."""
import argparse
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import common
from zcausal import ard_mmd as A, problems, runs, stats
import exp_c_ard_mmd as C
import synthetic_numbers
from test_ard_mmd import D as PLANTED_D, PROBLEM_DIMS, planted_clouds


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
    summary = pd.DataFrame({"layer": 1, "objective": "contrastive", "start": "cold", "k": 8,
                            "lambda": [0.0, 0.1, 1.0, 10.0], "ce_val_final": [0.9, 0.5, 0.5, 2.0]})
    assert C.mark_selected(summary)["selected"].tolist() == [False, False, True, False]
    # one selection per k: the warm start of k 16 is another fit, the cold start's rows one fit
    both = pd.concat([summary, summary.assign(k=16),
                      summary.assign(start="warm", k=16, ce_val_final=[0.1, 0.5, 0.5, 2.0])])
    assert C.mark_selected(both.reset_index(drop=True))["selected"].tolist() == \
        [False, False, True, False] * 2 + [True, False, False, False]


def test_fit_list_has_the_cold_start_once_and_a_warm_start_per_k():
    args = C.parse_args(["--model", "x", "--k", "4", "6", "--lambdas", "0", "1"])
    assert C.fit_list(args) == [("warm", 4, 0.0), ("warm", 4, 1.0), ("warm", 6, 0.0),
                                ("warm", 6, 1.0), ("cold", None, 0.0), ("cold", None, 1.0)]


def planted_masks():
    """Two SVD masks on the planted clouds' D coordinates: k = 6 on the problem coordinates
    (PROBLEM_DIMS, the ones the zh and en versions share), k = 4 on noise coordinates 12..15, each
    with a little energy elsewhere, rising with the index (no ties), and summing to k."""
    masks = {}
    for k, dims in ((4, [12, 13, 14, 15]), (6, PROBLEM_DIMS)):
        energy = torch.linspace(0.001, 0.01, PLANTED_D)
        energy[dims] = 1.0
        masks[k] = energy * k / energy.sum()
    return masks


def test_several_k_on_a_planted_case_the_cold_fit_once_and_the_k_that_holds_z_enriched(tmp_path):
    """Planted clouds whose problems are told apart only by PROBLEM_DIMS, and the masks of
    planted_masks: one batch fits the cold start once and the warm start once per k, each warm
    start beginning with its mask's top k inside Z; the cold fit finds the problem coordinates, so
    against the k = 6 mask its overlap is enriched (the primary test: the largest k, 50 not run)
    and against the k = 4 mask it is not."""
    data = {split: planted_clouds(seed=seed) for split, seed in (("train", 0), ("val", 1),
                                                                  ("test", 2))}
    l_ref = A.median_pairwise_distance([data["train"][0].flat, data["train"][1].flat])
    args = C.parse_args(["--model", "x", "--k", "4", "6", "--lambdas", "0.01", "--steps", "150",
                         "--min-steps", "150", "--lr", "0.1", "--log-every", "150"])
    masks = planted_masks()
    unit = C.compute_layer_fits(data, 5, {"l_ref": l_ref}, "contrastive", masks, args,
                                argparse.Namespace(update=lambda n: None))
    assert unit["fits"] == [("warm", 4, 0.01), ("warm", 6, 0.01), ("cold", None, 0.01)]
    start = pd.DataFrame(unit["traces"]).query("step == 0").set_index(["start", "k"], drop=False)
    assert start.loc[("warm", 4), "z_size"].item() == 4 and start.loc[("warm", 6), "z_size"].item() == 6
    in_z = set(np.flatnonzero((unit["log_l"][2] < math.log(l_ref)).numpy()))
    assert in_z == set(PROBLEM_DIMS), in_z  # the cold fit finds the shared coordinates

    rows = pd.DataFrame(unit["rows"]).set_index(["start", "k"])
    # each warm start began from its own mask: on the problem coordinates (k 6) held-out
    # retrieval is right from the start, on noise (k 4) it starts near chance (1/16)
    init = rows["retrieval_test_init"]
    assert init[("warm", 6)] >= 0.9 > init[("cold", 6)] > 0.3 > init[("warm", 4)]
    assert rows.loc[("warm", 6), "overlap"] == 6 and rows.loc[("warm", 4), "overlap"] == 0
    assert rows.loc[("cold", 6), "overlap"] == 6 and rows.loc[("cold", 4), "overlap"] == 0
    assert rows.loc[("cold", 6), "retrieval_test_final"] == rows.loc[("cold", 4),
                                                                      "retrieval_test_final"]
    C.save_results(tmp_path, [unit], [5], masks, args)
    runs.write_json(tmp_path / "config.json", {"basis_layer": 5, "n_pairs": 16,
                                               "args": {"k": [4, 6]}})
    from zcausal.summaries import exp_c as S
    table = S.overlap_table(tmp_path).set_index(["start", "k"])
    assert table["primary"].idxmax() == ("cold", 6)
    assert table.loc[("cold", 6), "verdict"] == "enrichment"
    assert table.loc[("cold", 4), "verdict"] == "no enrichment"
    assert S.headline(tmp_path)["verdict"] == "enrichment"
    npz = np.load(tmp_path / "lengthscales.npz")
    assert npz["log10_l"].shape == (1, 1, 2, 2, 1, PLANTED_D)
    np.testing.assert_allclose(npz["z_energy"].sum(1), [4, 6], rtol=1e-5)


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
    (["--layers", "1", "9"], "pass --layers between 0 and 3 (or fractions of depth with "
                             "--layer-depths)"),
    (["--layer", "4"], "pass --layer between 0 and 3"),
    (["--layer-depths", "0.5", "1.0"], "--layer-depths 1.0 is not a fraction"),
    (["--depth", "0"], "--depth 0.0 is not a fraction"),
    (["--layers", "1", "--layer-depths", "0.5"], "not both"),
    (["--k", "0"], "pass --k between 1 and 63"), (["--k", "64"], "every coordinate in the SVD mask"),
    (["--k", "8", "64"], "pass --k between 1 and 63"), (["--k", "8", "8"], "--k 8 8: each k once"),
    (["--lambdas", "0.1", "0.1"], "distinct"), (["--device", "cuda"], "no CUDA device")])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, prompts_file, bad, message, capsys):
    if bad[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exc:
        runs.run_cli(C.main, C.parse_args(_argv(tmp_path, prompts_file, *bad)))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err
    assert bad[0] != "--layers" or "--depth" not in err  # C's --layers has no --depth beside it
    assert not any((tmp_path / name).exists() for name in ("out", "fig", "cache"))


FAST = ["--layers", "1", "3", "--steps", "10", "--min-steps", "0", "--lambdas", "0", "0.1", "10",
        "--layer", "2", "--k", "8", "16"]
OVERLAP_COLUMNS = ["overlap", "overlap_expected", "overlap_lo", "overlap_hi",
                   "overlap_p", "overlap_p_depletion", "energy_share", "energy_chance"]


def test_main_end_to_end(tmp_path, prompts_file, monkeypatch, capsys):
    args = C.parse_args(_argv(tmp_path, prompts_file, *FAST, "--objective", "contrastive", "plan"))
    summary = C.main(args)
    out = tmp_path / "out"
    # 2 layers x 2 objectives x 3 lambdas x (warm k 8, warm k 16, cold against k 8 and k 16)
    assert len(summary) == 2 * 2 * 3 * 4 and summary["selected"].sum() == 2 * 2 * 4
    assert list(summary.columns[:5]) == ["layer", "objective", "start", "k", "lambda"]
    cold = summary[summary.start == "cold"]
    fit_columns = [c for c in summary.columns if c not in OVERLAP_COLUMNS + ["k"]]
    pd.testing.assert_frame_equal(cold[cold.k == 8][fit_columns].reset_index(drop=True),
                                  cold[cold.k == 16][fit_columns].reset_index(drop=True))
    npz = np.load(out / "lengthscales.npz")
    assert npz["log10_l"].shape == (2, 2, 2, 2, 3, 64) and np.isfinite(npz["log10_l"]).all()
    assert npz["ks"].tolist() == [8, 16] and npz["z_energy"].shape == (2, 64)
    np.testing.assert_allclose(npz["z_energy"].sum(1), [8, 16], rtol=1e-4)
    cold_i = list(npz["starts"]).index("cold")
    np.testing.assert_array_equal(npz["log10_l"][:, :, cold_i, 0], npz["log10_l"][:, :, cold_i, 1])
    traces = pd.read_csv(out / "traces.csv")
    assert list(traces.columns[:7]) == ["layer", "objective", "start", "k", "lambda", "step",
                                        "loss"]
    # one trace per fit: the cold start once (k blank), the warm start once per k
    assert traces["step"].max() == 10 and len(traces) == 2 * 2 * 3 * 3 * 2
    assert traces[traces.start == "cold"]["k"].isna().all()
    warm0 = traces[(traces.start == "warm") & (traces.step == 0)]
    assert sorted(set(warm0["k"])) == [8, 16]
    assert (warm0["z_size"] == warm0["k"]).all()  # each warm start begins with its k inside Z
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
    overlap = runs.load_csv(out / "overlap.csv")
    assert len(overlap) == summary["selected"].sum() and overlap["primary"].sum() == 1
    primary = overlap[overlap.primary].iloc[0]
    assert (primary.k, primary.start, primary.objective) == (16, "cold", "contrastive")
    assert sorted(overlap.groupby(["start", "k"]).size().items()) == [
        (("cold", 8), 4), (("cold", 16), 4), (("warm", 8), 4), (("warm", 16), 4)]
    assert config["k"] == [8, 16] and "rank-16" in config["primary_test"]
    assert set(overlap.columns) >= {"overlap_expected", "overlap_lo", "overlap_hi",
                                    "p_enrichment", "p_depletion", "p_enrichment_holm", "verdict"}
    assert summary["retrieval_test_final"].between(0, 1).all()
    # the contrastive penalty at the cold start is lambda * 2N (N training problems)
    cold = summary[(summary.objective == "contrastive") & (summary.start == "cold")
                   & (summary.layer == 1) & (summary.k == 8)]
    n_train = len(config["splits"]["train"])
    first = traces[(traces.objective == "contrastive") & (traces.start == "cold")
                   & (traces.step == 0) & (traces.layer == 1)].set_index("lambda")["penalty"]
    np.testing.assert_allclose(first.loc[cold["lambda"]], cold["lambda"] * 2 * n_train, rtol=1e-5)

    for name in ("z_size", "traces"):
        (figures / f"{name}.png").unlink()
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    (out / "overlap.csv").unlink()
    capsys.readouterr()
    C.main(C.parse_args(_argv(tmp_path, prompts_file, "--replot")))
    assert (figures / "z_size.png").is_file() and (figures / "traces.png").is_file()
    printed = capsys.readouterr().out
    assert "wrote" in printed and "overlap.csv" in printed and "z_size.png" in printed
    assert "for each k of 8 and 16" in printed and "warm start from the rank-16 mask" in printed
    assert "k = 16, the largest k run; the plan's 50 was not" in printed
    assert runs.load_csv(out / "overlap.csv").equals(overlap)


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
    capsys.readouterr()
    C.main(C.parse_args(_argv(tmp_path, prompts_file, *FAST, "--resume")))  # nothing left
    assert "ARD fits" not in capsys.readouterr().err  # no empty progress bar


# ----------------------------------------------------------------------------------------------
# The overlap against chance and the sentences, on a run folder written by hand

def fake_run(tmp_path, rows, d=100, basis_layer=5, k=10):
    """The files summary_lines and headline read, with the given selected fits."""
    base = {"objective": "contrastive", "selected": True, "energy_share": 0.1,
            "energy_chance": 0.1, "retrieval_test_init": 0.5, "retrieval_test_final": 0.8,
            "retrieval_chance_test": 0.1}
    pd.DataFrame([{**base, **row} for row in rows]).to_csv(tmp_path / "summary.csv", index=False)
    (tmp_path / "traces.csv").write_text("layer\n")
    np.savez(tmp_path / "lengthscales.npz", z_energy=np.ones(d))
    runs.write_json(tmp_path / "config.json", {"basis_layer": basis_layer, "n_pairs": 1,
                                               "args": {"k": k}})
    return tmp_path


ROWS = [dict(layer=5, start="cold", z_size=10, overlap=0, **{"lambda": 0.0}),
        dict(layer=5, start="warm", z_size=9, overlap=3, **{"lambda": 0.0}),    # raw p 0.033
        dict(layer=3, start="cold", z_size=12, overlap=4, **{"lambda": 0.0})]   # raw p 0.036


def test_primary_is_the_cold_start_at_the_basis_layer_and_the_rest_are_holm_corrected(tmp_path):
    from zcausal.summaries import exp_c as S
    table = S.overlap_table(fake_run(tmp_path, ROWS)).set_index(["layer", "start"])
    assert table["primary"].tolist() == [False, True, False]  # sorted: layer 3 first
    assert table.loc[(5, "cold"), "verdict"] == "no enrichment"  # 0 of 10, chance 1
    assert table.loc[(5, "cold"), "p_depletion"] == pytest.approx(0.330, abs=0.001)
    assert np.isnan(table.loc[(5, "cold"), "p_enrichment_holm"])
    others = [(3, "cold"), (5, "warm")]
    raw = table.loc[others, "p_enrichment"]
    assert (raw < 0.05).all()  # each alone would pass; Holm over the two does not
    np.testing.assert_allclose(table.loc[others, "p_enrichment_holm"], stats.holm(raw))
    assert (table.loc[others, "p_enrichment_holm"] > 0.05).all()
    assert (table.loc[others, "verdict"] == "no enrichment").all()
    # the primary is read at its raw p: 6 of 10 where 1 is expected
    rows = [dict(ROWS[0], overlap=6)] + ROWS[1:]
    table = S.overlap_table(fake_run(tmp_path, rows)).set_index(["layer", "start"])
    assert table.loc[(5, "cold"), "verdict"] == "enrichment"


def test_sentences_say_no_enrichment_the_coordinate_count_and_lambda_zero(tmp_path):
    from zcausal.summaries import exp_c as S
    out = fake_run(tmp_path, ROWS)
    text = " ".join(S.summary_lines(out))
    assert "overlap 0 with the top 10 (chance 1 [0, 3]" in text
    assert "no enrichment" in text and "do not overlap" not in text and "top-50" not in text
    assert "1 pair (d = 100)" in text and "nan" not in text
    assert "lambda = 0 was selected in all 3 selected fits" in text
    assert "the sparsity penalty never helped held-out retrieval" in text
    head = S.headline(out)
    assert set(head) == {"verdict", "value", "lead"} and head["verdict"] == "no enrichment"
    assert head["value"] == "overlap 0 of 10 vs chance 1 [0, 3] (P(≥ 0) = 1)"
    assert 1 <= len(head["lead"]) <= 3 and "lambda = 0 won in all 3" in head["lead"][-1]

    some = [dict(r, **{"lambda": 0.1 if i else 0.0}) for i, r in enumerate(ROWS)]
    text = " ".join(S.summary_lines(fake_run(tmp_path, some)))
    assert "lambda = 0 was selected in 1 of 3 selected fits." in text
    assert "never helped" not in text


def test_an_empty_z_is_not_measured_and_an_unfinished_run_is_a_usage_error(tmp_path):
    from zcausal.summaries import exp_c as S
    out = fake_run(tmp_path, [dict(layer=5, start="cold", z_size=0, overlap=0,
                                   **{"lambda": 10.0})])
    assert S.headline(out)["verdict"] == "not measured (ARD's Z is empty)"
    assert "overlap not measured (ARD's Z is empty)" in " ".join(S.summary_lines(out))
    (out / "summary.csv").unlink()
    with pytest.raises(runs.UsageError, match="summary.csv"):
        S.headline(out)


def test_holm_by_hand():
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, np.nan]), [0.03, 0.06, 0.06, np.nan])


def test_with_several_k_the_primary_is_k_50_where_run_else_the_largest(tmp_path):
    """Rows of a run of several k (a k column, config.json's --k a list): the primary is the cold
    fit against the k = 50 mask when 50 ran, else against the largest k; overlap.csv keeps the k
    column, and the sentences name the mask of each overlap. A run of one k from before --k took
    several (no k column) gets an overlap.csv without one, as it was written."""
    from zcausal.summaries import exp_c as S
    assert (stats.primary_k([20, 50, 100]), stats.primary_k([30, 20]), stats.primary_k([50])) == \
        (50, 30, 50)
    cold = dict(layer=5, start="cold", z_size=10, **{"lambda": 0.0})
    for ks, primary in (([20, 50, 100], 50), ([10, 20], 20)):
        rows = [dict(cold, k=k, overlap=i) for i, k in enumerate(ks)] + [
            dict(cold, start="warm", k=k, overlap=3) for k in ks]
        out = fake_run(tmp_path, rows, k=ks)
        table = S.overlap_table(out)
        assert table.loc[table["primary"], ["start", "k"]].values.tolist() == [["cold", primary]]
        S.save_overlap_table(out)
        assert runs.load_csv(out / "overlap.csv")["k"].tolist() == table["k"].tolist()
        text = " ".join(S.summary_lines(out))
        assert text.count("cold start: lambda 0, |Z| = 10;") == 1  # one fit, one sentence
        assert f"overlap with the rank-{ks[1]} mask 1 with the top 10" in text
        assert f"warm start from the rank-{ks[0]} mask" in text
        # the cold fit counted once: 1 + len(ks) fits, not 2 len(ks) rows
        assert f"lambda = 0 was selected in all {1 + len(ks)} selected fits" in text
        head = S.headline(out)
        assert f"at k = {primary} vs chance" in head["value"]
    assert "k = 20, the largest k run; the plan's 50 was not" in text
    S.save_overlap_table(fake_run(tmp_path, ROWS))  # no k column: a run from before
    assert "k" not in runs.load_csv(tmp_path / "overlap.csv").columns
