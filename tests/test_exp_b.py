"""Experiment B: the ratio against its chance value, the activation capture it relies on, the cache,
bad input, and an end-to-end run on the tiny model."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import common
from zcausal import prereg, problems, runs
import exp_b_residual as eb
from zcausal.summaries import exp_b as summary

EN = ["Tom has {a} apples and buys {b} more. How many apples does he have?",
      "A train goes {a} km per hour for {b} hours. How far does it go?"]
ZH = ["小明有{a}个苹果，又买了{b}个。他现在有多少个苹果？",
      "火车每小时行驶{a}公里，行驶了{b}小时。一共行驶了多少公里？"]


def write_prompts(path, n):
    pairs = [{"id": f"p{i}", "category": "test", "en": EN[i % 2].format(a=i + 2, b=3 * i + 1),
              "zh": ZH[i % 2].format(a=i + 2, b=3 * i + 1), "answer": i} for i in range(n)]
    data = {"templates": {"cot": {"en": "Question: {question}\nAnswer:", "zh": "问题：{question}\n答案："}},
            "pairs": pairs}
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def cli(tmp_path, *extra):
    prompts = tmp_path / "prompts.json"
    if not prompts.exists():
        write_prompts(prompts, 6)
    return eb.parse_args(["--model", common.TINY_MODEL, "--device", "cpu", "--layer", "2",
                          "--k", "4", "--prompts", str(prompts), "--out", str(tmp_path / "exp_b"),
                          "--figures", str(tmp_path / "fig"), "--cache-dir",
                          str(tmp_path / "cache"), *extra])


# ----------------------------------------------------------------------------------------------
# The ratio

@pytest.mark.parametrize("d,k", [(64, 8), (256, 20)])
def test_isotropic_updates_average_chance_ratio(d, k):
    updates = torch.randn(4000, d, dtype=torch.float64)
    ratios = eb.compute_ratios(updates, common.random_basis(d, k, seed=3))
    assert ratios["R"].mean() == pytest.approx(np.sqrt(k / (d - k)), rel=0.04)
    assert ratios["energy"].mean() == pytest.approx(k / d, rel=0.04)
    np.testing.assert_allclose(ratios["norm_z"] ** 2 + ratios["norm_zperp"] ** 2,
                               ratios["norm"] ** 2, rtol=1e-10)


def test_isotropic_updates_against_the_model_basis(tiny):
    model, _ = tiny
    basis = common.z_basis(model, 2, 4)
    ratios = eb.compute_ratios(torch.randn(4000, 64), basis)
    assert ratios["R"].mean() == pytest.approx(np.sqrt(4 / 60), rel=0.05)


def test_ratio_separates_updates_inside_and_outside_z():
    basis = common.random_basis(32, 4, seed=0).double()
    inside = torch.randn(10, 4, dtype=torch.float64) @ basis
    outside = torch.randn(10, 32, dtype=torch.float64)
    outside -= (outside @ basis.T) @ basis
    assert eb.compute_ratios(inside, basis)["energy"] == pytest.approx(np.ones(10))
    assert eb.compute_ratios(inside, basis)["R"].min() > 1e3  # float32 basis: not exactly inf
    assert eb.compute_ratios(outside, basis)["R"].max() < 1e-6


def test_matched_band_sees_updates_along_the_main_directions_of_the_stream():
    """Updates that move along the directions in which the basis layer's states vary most: a
    uniform random subspace sees k/d of their energy, one drawn with the states' covariance much
    more; a basis with no variance (outside the states' span) sees none and ranks below both."""
    gen = torch.Generator().manual_seed(0)
    d, k, n = 32, 4, 40
    scales = torch.ones(d)
    scales[:4] = 20.0  # four dominant directions of the states
    pooled = torch.randn(2 * n, 3, d, generator=gen, dtype=torch.float64) * scales
    pairs = [{"id": f"p{i}"} for i in range(n)]
    outside = torch.eye(d, dtype=torch.float64)[-k:]
    tables, shares = eb.compute_all(pooled, pairs, outside, k, d, 20, 0, basis_layer=0)
    table = tables["per_layer"]
    both = table[table["lang"] == "all"]
    assert (both["matched_energy_mean"] > 4 * both["rand_energy_mean"]).all()
    assert both["rand_energy_mean"].between(0.5 * k / d, 2 * k / d).all()
    assert (both["frac_matched_R_ge"] == 1).all() and (both["frac_random_R_ge"] == 1).all()
    assert shares["matched"] > 0.5 > shares["uniform"] and shares["z"] < 0.01


def test_stacked_bases_match_one_at_a_time():
    updates = torch.randn(5, 3, 16, dtype=torch.float64)
    bases, _ = eb.random_bases(16, 3, 4, seed=1)
    stacked = eb.compute_ratios(updates, bases)["R"]
    assert stacked.shape == (4, 5, 3)
    for m in range(4):
        np.testing.assert_allclose(stacked[m], eb.compute_ratios(updates, bases[m])["R"])


# ----------------------------------------------------------------------------------------------
# Captured layer outputs and the cache

TEXTS = ["Tom has 3 apples.", "小明有3个苹果，又买了5个。他现在有多少个苹果？",
         "A train travels 60 kilometers per hour for 2 hours. How far does it go?"]


@pytest.mark.parametrize("drop_first", [False, True])
def test_captured_outputs_equal_hidden_states(tiny, drop_first):
    """Hooked, batched (left-padded) outputs equal each text's own output_hidden_states below the
    last layer; the last layer's hook output is the state before the final norm."""
    model, tokenizer = tiny
    n = common.num_layers(model)
    pooled = common.extract_activations(model, tokenizer, TEXTS, list(range(-1, n)), pool="mean",
                                        drop_first=drop_first, batch_size=3, cache_dir=None)
    tokens = common.extract_activations(model, tokenizer, TEXTS, [n - 1], pool=None,
                                        drop_first=drop_first, batch_size=3, cache_dir=None)
    start = 1 if drop_first else 0
    for i, text in enumerate(TEXTS):
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        for j, layer in enumerate(range(-1, n - 1)):
            expected = hidden[layer + 1][0, start:].mean(0)
            torch.testing.assert_close(pooled[i, j], expected, atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            normed = model.model.norm(tokens[i][:, 0].float())
        torch.testing.assert_close(normed, hidden[n][0, start:], atol=2e-2, rtol=2e-2)
        assert not torch.allclose(pooled[i, n], hidden[n][0, start:].mean(0), atol=1e-2)


def test_cache_is_reused_and_invalidated(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    cache = tmp_path / "cache"

    def files():
        return sorted(p.name for p in cache.glob("acts-*.pt"))

    first = common.extract_activations(model, tokenizer, TEXTS, [-1, 0, 1], cache_dir=cache)
    assert len(files()) == 1
    real_capture = common.capture_layer_outputs

    def no_forward(*a, **k):
        raise AssertionError("the model ran although the cache holds this input")

    monkeypatch.setattr(common, "capture_layer_outputs", no_forward)
    torch.testing.assert_close(
        common.extract_activations(model, tokenizer, TEXTS, [-1, 0, 1], cache_dir=cache), first)
    monkeypatch.setattr(common, "capture_layer_outputs", real_capture)

    changed = common.extract_activations(model, tokenizer, TEXTS[:2] + ["Other prompt 7."],
                                         [-1, 0, 1], cache_dir=cache)
    assert len(files()) == 2
    torch.testing.assert_close(changed[:2], first[:2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(changed[2], first[2])

    model.name_or_path_for_results = "another-model"
    common.extract_activations(model, tokenizer, TEXTS, [-1, 0, 1], cache_dir=cache)
    assert len(files()) == 3

    model.to(torch.bfloat16)
    common.extract_activations(model, tokenizer, TEXTS, [-1, 0, 1], cache_dir=cache)
    assert len(files()) == 4

    common.extract_activations(model, tokenizer, TEXTS, [-1, 0, 1], drop_first=False,
                               cache_dir=cache)
    assert len(files()) == 5

    common.extract_activations(model, tokenizer, TEXTS, [-1, 0, 1], drop_numbers=True,
                               cache_dir=cache)
    assert len(files()) == 6
    common.extract_activations(model, tokenizer, TEXTS, [-1, 0, 1], skip_prefix=[2, 0, 1],
                               cache_dir=cache)
    assert len(files()) == 7


def test_drop_numbers_removes_exactly_the_tokens_of_numbers_on_a_hand_checked_prompt(tiny):
    """The tiny tokenizer (Qwen2's pre-tokenizer: one token per digit, the space before a number a
    token of its own) writes this prompt as (index: token)
    0 Tom, 1 ' p', 2 a, 3 i, 4 d, 5 ' ', 6 $, 7 1, 8 ',', 9 2, 10 5, 11 0, 12 ' for', 13 ' ', 14 3,
    15 '.', 16 5, 17 ' ', 18 k, 19 g, 20 ' ', 21 o, 22 f, 23 ' ', 24 1, 25 2, 26 ' apples', 27 '.'
    The numbers are 1,250 (7-11, the comma included), 3.5 (14-16, the point included) and 12
    (24-25); the spaces, the dollar sign and the full stop at the end are not numbers."""
    model, tokenizer = tiny
    text = "Tom paid $1,250 for 3.5 kg of 12 apples."
    pieces = [tokenizer.decode([t]) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert pieces[5:17] == [" ", "$", "1", ",", "2", "5", "0", " for", " ", "3", ".", "5"]
    assert pieces[23:] == [" ", "1", "2", " apples", "."]
    numbers = [7, 8, 9, 10, 11, 14, 15, 16, 24, 25]
    assert common.number_token_mask(tokenizer, text).nonzero().flatten().tolist() == numbers
    zh = "小明有12个苹果，花了3.5元。"  # 小 (2 byte pieces) 明有 | 1 | 2 | 个苹果 | ， | 花 (3) | 了 | 3 . 5 | 元 | 。
    zh_numbers = [2, 3, 10, 11, 12]
    assert common.number_token_mask(tokenizer, zh).nonzero().flatten().tolist() == zh_numbers
    assert common.number_token_counts(tokenizer, [text, zh]) == {
        "tokens": len(pieces) + 15, "number_tokens": 15}

    # the extraction leaves out exactly these positions (and the first) from means and clouds
    for drop_first in (True, False):
        tokens = common.extract_activations(model, tokenizer, [text, zh], [1], pool=None,
                                            drop_first=drop_first, cache_dir=None)
        kept = common.extract_activations(model, tokenizer, [text, zh], [1], pool=None,
                                          drop_first=drop_first, drop_numbers=True, cache_dir=None)
        pooled = common.extract_activations(model, tokenizer, [text, zh], [1], drop_first=drop_first,
                                            drop_numbers=True, cache_dir=None)
        for i, number_positions in enumerate((numbers, zh_numbers)):
            start = int(drop_first)
            keep = [p for p in range(start, start + len(tokens[i]))
                    if p not in number_positions]
            torch.testing.assert_close(kept[i], tokens[i][[p - start for p in keep]])
            # kept tokens are stored in float16: each differs from the float32 state the mean
            # was taken over by at most half a float16 step (|x| * 2^-11), and so does their mean
            float16_step = float(kept[i].float().abs().max()) * 2.0 ** -11
            torch.testing.assert_close(pooled[i], kept[i].float().mean(0), atol=float16_step,
                                       rtol=0)


def test_a_text_left_without_tokens_is_a_usage_error(tiny):
    model, tokenizer = tiny
    with pytest.raises(runs.UsageError, match="no token left"):
        common.extract_activations(model, tokenizer, ["Tom has 3 apples.", "12"], [0],
                                   drop_numbers=True, cache_dir=None)


# ----------------------------------------------------------------------------------------------
# The script

@pytest.mark.parametrize("extra", [["--layer", "4"], ["--basis-layer", "-1"], ["--k", "0"],
                                   ["--k", "64"], ["--k", "4", "4"], ["--n-random", "-1"],
                                   ["--prompts", "MISSING.json"]])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, extra):
    args = cli(tmp_path, *extra)
    if extra[0] == "--prompts":
        args.prompts = tmp_path / "missing.json"
    with pytest.raises(SystemExit) as exit_info:
        runs.run_cli(eb.main, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    for name in ("exp_b", "fig", "cache"):
        assert not (tmp_path / name).exists()


def test_main_end_to_end(tiny, tmp_path, monkeypatch, capsys):
    args = cli(tmp_path, "--n-random", "20")
    tables = eb.main(args)
    out = tmp_path / "exp_b"
    for name in ("per_prompt", "per_layer", "asymmetry", "random_draws"):
        assert (out / f"{name}.csv").is_file()
    figure = runs.figure_dir(out, tmp_path / "fig") / "residual_ratio.png"
    assert figure.read_bytes()[:4] == b"\x89PNG"
    config = json.loads((out / "config.json").read_text())
    assert (config["basis_layer"], config["k"], config["drop_first"], config["n_pairs"],
            config["d"], config["n_random"]) == (2, [4], True, 6, 64, 20)
    assert config["preregistration"]["sha256"] == prereg.sha256()  # the declaration in force

    per_layer = pd.read_csv(out / "per_layer.csv")
    assert len(per_layer) == 4 * 3 and set(per_layer["lang"]) == {"zh", "en", "all"}
    assert sorted(per_layer["from_layer"].unique()) == [-1, 0, 1, 2]
    assert per_layer["R_chance"].iloc[0] == pytest.approx(np.sqrt(4 / 60))
    for prefix in ("rand", "matched"):
        assert (per_layer[f"{prefix}_R_lo"] <= per_layer[f"{prefix}_R_hi"]).all()
    draws = pd.read_csv(out / "random_draws.csv")
    assert draws.groupby("kind")["draw"].nunique().to_dict() == {"matched": 20, "uniform": 20}
    shares = config["variance_share_of_basis_layer_states"]["4"]  # per k
    assert shares["matched"] > shares["uniform"] and set(shares) == {"z", "uniform", "matched"}
    row = per_layer[(per_layer["lang"] == "all") & (per_layer["from_layer"] == 2)].iloc[0]
    matched = draws[(draws["kind"] == "matched") & (draws["lang"] == "all")
                    & (draws["from_layer"] == 2)]["R_mean"]
    assert row["frac_matched_R_ge"] == pytest.approx(np.mean(matched >= row["R_mean"]))

    # the saved R of one text and transition, recomputed from the pooled outputs directly
    model, tokenizer = tiny
    pairs = problems.load_prompts(args.prompts)["pairs"]
    pooled = common.extract_activations(model, tokenizer, [pairs[1]["en"]], [0, 1],
                                        cache_dir=None)[0]
    coords = (pooled[1] - pooled[0]).double() @ common.z_basis(model, 2, 4).double().T
    total = ((pooled[1] - pooled[0]).double() ** 2).sum()
    per_prompt = pd.read_csv(out / "per_prompt.csv")
    row = per_prompt[(per_prompt["id"] == "p1") & (per_prompt["lang"] == "en")
                     & (per_prompt["from_layer"] == 0)].iloc[0]
    expected = float((coords ** 2).sum().sqrt() / (total - (coords ** 2).sum()).sqrt())
    assert row["R"] == pytest.approx(expected, rel=1e-4)
    zh = per_layer[(per_layer["lang"] == "zh") & (per_layer["from_layer"] == 0)].iloc[0]
    assert zh["R_mean"] == pytest.approx(per_prompt[(per_prompt["lang"] == "zh")
                                                    & (per_prompt["from_layer"] == 0)]["R"].mean())
    asym = pd.read_csv(out / "asymmetry.csv")
    assert len(asym) == 4
    np.testing.assert_allclose(asym["diff_mean"], asym["R_zh"] - asym["R_en"], atol=1e-12)
    rand = draws[(draws["lang"] != "all") & (draws["kind"] == "uniform")].pivot_table(
        index=["from_layer", "draw"], columns="lang", values="R_mean")
    rand_diff = (rand["zh"] - rand["en"]).loc[1]
    row = asym[asym["from_layer"] == 1].iloc[0]
    assert row["frac_random_absdiff_ge"] == pytest.approx(
        np.mean(np.abs(rand_diff) >= abs(row["diff_mean"])))

    # the primary test: Z's R on the update into the basis layer's input (the output of layer 1)
    # among the Haar draws (the declared null), as random_draws.csv has it; matched ones beside
    row, tests, verdict, _ = summary.primary_test(per_layer, draws, config, 4)
    assert (row["from_layer"], row["to_layer"]) == (0, 1)
    for kind in ("uniform", "matched"):
        mine = draws[(draws["kind"] == kind) & (draws["lang"] == "all")
                     & (draws["from_layer"] == 0)]["R_mean"]
        assert tests[kind]["p_above"] == pytest.approx((1 + (mine >= row["R_mean"]).sum()) / 21)
    assert tests["primary"] is tests["uniform"]
    head = summary.headline(out)
    assert set(head) == {"verdict", "value", "lead"} and head["verdict"] == verdict
    assert verdict.startswith(("Z above random (one-sided p", "not above random (one-sided p"))
    assert "covariance-matched draws (shown beside, no label)" in head["value"]
    assert 1 <= len(head["lead"]) <= 3 and "nan" not in " ".join(summary.summary_lines(out))

    # --replot redraws from the CSVs without loading a model, and says what it wrote
    figure.unlink()
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    capsys.readouterr()
    eb.main(cli(tmp_path, "--replot"))
    assert figure.is_file() and f"wrote {figure}" in capsys.readouterr().out
    assert tables["per_layer"].shape[0] == 12


def test_keep_first_token_changes_and_records_the_pooling(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "load_model", lambda *a, **k: tiny)  # the same seed-0 model
    base = eb.main(cli(tmp_path))["per_prompt"]
    args = cli(tmp_path, "--keep-first-token", "--overwrite")
    kept = eb.main(args)["per_prompt"]
    assert json.loads((tmp_path / "exp_b" / "config.json").read_text())["drop_first"] is False
    assert not pd.read_csv(tmp_path / "exp_b" / "per_layer.csv")["drop_first"].any()
    assert not np.allclose(base["R"], kept["R"])


def test_existing_results_are_not_overwritten(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "load_model", lambda *a, **k: tiny)
    eb.main(cli(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        runs.run_cli(eb.main, cli(tmp_path))
    assert exit_info.value.code == 2


def test_several_k_and_no_random_draws(tiny, tmp_path, monkeypatch, capsys):
    """--k 4 8 writes a k column and a paragraph per k; --n-random 0 leaves the bands out and the
    summaries say not tested (no random draws) instead of failing."""
    monkeypatch.setattr(common, "load_model", lambda *a, **k: tiny)
    tables = eb.main(cli(tmp_path, "--k", "4", "8", "--n-random", "0"))
    out = tmp_path / "exp_b"
    per_layer = pd.read_csv(out / "per_layer.csv")
    assert sorted(per_layer["k"].unique()) == [4, 8] and len(per_layer) == 2 * 4 * 3
    assert per_layer["rand_R_lo"].isna().all() and per_layer["frac_matched_R_ge"].isna().all()
    assert pd.read_csv(out / "random_draws.csv").empty
    assert set(pd.read_csv(out / "asymmetry.csv")["k"]) == {4, 8}
    assert np.allclose(per_layer.groupby("k")["R_chance"].first(), np.sqrt([4 / 60, 8 / 56]))
    r4 = tables["per_prompt"].query("k == 4")["R"].to_numpy()
    assert not np.allclose(r4, tables["per_prompt"].query("k == 8")["R"].to_numpy())
    text = " ".join(summary.summary_lines(out))
    assert "k = 4 (d = 64)" in text and "k = 8 (d = 64)" in text
    assert text.count("not tested (no random draws)") >= 3 and "nan" not in text
    assert "k = 8): R " in text  # the primary test at the largest k (50 was not run)
    head = summary.headline(out)
    assert head["verdict"] == "not tested (no random draws)" and "nan" not in head["value"]
    assert (runs.figure_dir(out, tmp_path / "fig") / "residual_ratio.png").is_file()


def test_the_largest_difference_is_said_as_a_magnitude_with_its_direction():
    asym = pd.DataFrame({"from_layer": [0, 1], "to_layer": [1, 2], "n_pairs": [1, 1],
                         "diff_mean": [0.1, -0.2503], "wilcoxon_p": [np.nan, np.nan],
                         "frac_random_absdiff_ge": [0.5, 0.25]})
    text = summary._asymmetry_sentence(asym, 20)
    assert text.startswith("The largest |R_zh - R_en| is 0.25 (R_zh < R_en) at 1->2")
    assert "paired over 1 pair;" in text and "Wilcoxon p not measured" in text
    assert "at least as large: 5 of 20" in text and "-0.25" not in text
