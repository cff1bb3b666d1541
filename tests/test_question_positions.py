"""Experiment E's question set (zcausal/question.py): the question's tokens patched from a
counterfactual partner in the same language. The no-op reproduces the clean run, full interchange
at the embeddings is the partner's own run, batches change nothing, only the question's tokens are
patched; the command line runs it, resumes it and replots it."""
import json
import shutil

import numpy as np
import pytest
import torch

import common
import exp_e_layer_sweep as ee
from zcausal import bank, interchange, problems, question, runs
from zcausal.summaries import exp_e as summary

TEMPLATE = problems.load_prompts()["templates"]["direct"]


@pytest.fixture(scope="module")
def pairs():
    kept, partners, missing = question.partners(bank.generate_bank(1)[:5], seed=0)
    assert not missing
    return kept, partners


def prepared(model, tok, pairs, language, batch_size=3):
    return question.prepare(model, tok, pairs[0], pairs[1], TEMPLATE, language, batch_size)


def conditions(model, n_random=2):
    """none, full and two random 4-dim subspaces."""
    return ee.make_conditions(common.hidden_size(model), 4, [], n_random, 0)


def rows_of(frame, name, c):
    return frame[frame.condition == c.names.index(name)].sort_values("problem")


def partner_forward(model, tok, partner_pairs, language):
    """Each partner's own prompt through the full forward: (top1 at the last position, log p of
    its answer's first digit), arrays of N."""
    top1, first = [], []
    for p in partner_pairs:
        text = problems.format_prompt(TEMPLATE[language], p[language])[0]
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
        digit = problems.answer_continuation(tok, p["answer"], language, "direct")[0]
        top1.append(int(logp.argmax()))
        first.append(float(logp[digit]))
    return np.array(top1), np.array(first)


# ----------------------------------------------------------------------------------------------
# The engine

@pytest.mark.parametrize("language", ["en", "zh"])
def test_the_noop_row_reproduces_the_clean_run(tiny, pairs, language):
    model, tok = tiny
    state = prepared(model, tok, pairs, language)
    c = conditions(model)
    for layer in (0, 2):
        none = rows_of(question.run_rows(model, state, layer, c, 4), "none", c)
        clean = state.clean
        for column in ("logp_own", "logp_src", "first_own", "first_src", "lang_own"):
            assert np.allclose(none[column], clean[column], atol=1e-5), (layer, column)
        assert (none.top1.to_numpy() == clean.top1.to_numpy()).all()
        assert (none.patch_share == 0).all()


@pytest.mark.parametrize("language", ["en", "zh"])
def test_full_interchange_of_the_question_at_the_embeddings_is_the_partners_own_run(
        tiny, pairs, language):
    """The prompts differ only at the question's digit tokens, so replacing every question token's
    embedding by the partner's makes the problem's prompt the partner's: the patched last position
    reads as the partner's full forward (top1, log p of its first digit) and as its clean run
    through the engine (log p of both answers)."""
    model, tok = tiny
    state = prepared(model, tok, pairs, language)
    c = conditions(model)
    full = rows_of(question.run_rows(model, state, -1, c, 4), "full", c)
    top1, first = partner_forward(model, tok, pairs[1], language)
    assert (full.top1.to_numpy() == top1).all()
    assert (full.top1.to_numpy() == state.clean.source_top1.to_numpy()).all()
    assert np.allclose(full.first_src, first, atol=1e-4)
    assert np.allclose(full.logp_src, state.clean.source_logp_own, atol=1e-4)
    assert np.allclose(full.logp_own - full.logp_src, state.clean.ld_target, atol=1e-4)
    assert np.allclose(full.patch_share, 1, atol=1e-6)
    assert (np.abs(full.first_src - state.clean.first_src) > 1e-3).any()  # it did move


@pytest.mark.parametrize("language", ["en", "zh"])
def test_the_attention_readout_is_the_partners_attention_and_zero_for_the_noop(
        tiny, pairs, language):
    """Full interchange of the question at the embeddings with the readout at layer 2: the change
    of layer 2's attention at the last position is the total variation between the problem's and
    the partner's full-forward attention there (zcausal.attention on whole prompts); the no-op's
    is exactly 0; rows at or above the readout layer have none (NaN)."""
    from zcausal import attention
    model, tok = tiny
    state = prepared(model, tok, pairs, language)
    c, readout = conditions(model), 2
    frame = question.run_rows(model, state, -1, c, 4, readout)
    full, none = rows_of(frame, "full", c), rows_of(frame, "none", c)
    expected = []
    for p, q in zip(*pairs):
        probs = []
        for pair in (p, q):
            text = problems.format_prompt(TEMPLATE[language], pair[language])[0]
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            mask = torch.ones_like(ids)
            entering = common.capture_layer_outputs(model, ids, mask, [readout - 1])[readout - 1]
            probs.append(attention.layer_attention(model, readout, entering, mask)[:, :, -1])
        expected.append(float(attention.total_variation(*probs).mean()))
    assert np.allclose(full.attn_tv_last, expected, atol=1e-5)
    assert (full.attn_tv_all > 0).all() and (none.attn_tv_last == 0).all() \
        and (none.attn_tv_all == 0).all()
    above = question.run_rows(model, state, readout, c, 4, readout)
    assert above.attn_tv_last.isna().all() and above.attn_tv_all.isna().all()


def test_batched_rows_equal_one_at_a_time(tiny, pairs):
    model, tok = tiny
    state = prepared(model, tok, pairs, "zh")
    c = conditions(model)
    batched = question.run_rows(model, state, 1, c, 64, basis_layer=3)
    single = question.run_rows(model, state, 1, c, 1, basis_layer=3)
    assert (batched.top1 == single.top1).all()
    for column in ("logp_own", "logp_src", "first_own", "first_src", "lang_own", "patch_share",
                   "attn_tv_last", "attn_tv_all"):
        assert np.allclose(batched[column], single[column], atol=1e-5), column


@pytest.mark.parametrize("language", ["en", "zh"])
def test_only_the_questions_tokens_are_patched(tiny, pairs, language):
    """The mask holds the question's tokens: they decode to the question, what follows them is
    the template's ending, and every token where problem and partner differ lies inside. In the
    patched input every other suffix position is bit-identical; the question's take the source."""
    model, tok = tiny
    kept, partners = pairs
    state = prepared(model, tok, pairs, language)
    ending = TEMPLATE[language].split("{question}")[1]
    for u, (p, c) in enumerate(zip(kept, partners)):
        ids = tok(problems.format_prompt(TEMPLATE[language], p[language])[0],
                  add_special_tokens=False)["input_ids"]
        other = tok(problems.format_prompt(TEMPLATE[language], c[language])[0],
                    add_special_tokens=False)["input_ids"]
        columns = torch.nonzero(state.positions[u])[:, 0].tolist()
        start, end = (len(ids) - state.m + x for x in (columns[0], columns[-1] + 1))
        assert columns == list(range(columns[0], columns[-1] + 1))  # one run of tokens
        assert p[language] in tok.decode(ids[start:end])
        after = tok.decode(ids[end:])
        assert after and ending.endswith(after) and p[language][-1] not in after
        assert all(start <= i < end for i, (a, b) in enumerate(zip(ids, other)) if a != b)
    layer, d = 1, common.hidden_size(model)
    suffix = state.hidden[layer + 1][:, :state.m]
    source = state.source[layer + 1]
    patch = interchange.masked_patch(interchange.subspace_patch(
        torch.zeros(len(kept), 4, d), torch.ones(len(kept), dtype=torch.bool), source),
        state.positions)
    patched = patch(suffix)
    outside = ~state.positions
    assert torch.equal(patched[outside], suffix[outside])
    assert torch.allclose(patched[state.positions], source[state.positions], atol=1e-5)
    assert not torch.equal(suffix[state.positions], source[state.positions])


# ----------------------------------------------------------------------------------------------
# The command line

def cli(tmp_path, *extra):
    return ee.parse_args(["--model", common.TINY_MODEL, "--device", "cpu", "--limit", "6",
                          "--solved", "off", "--min-pairs", "6", "--layer", "2", "--k", "4",
                          "--n-random", "2", "--layers", "1", "2", "--position-sets", "question",
                          "--out", str(tmp_path / "exp_e"), "--figures", str(tmp_path / "fig"),
                          *extra])


@pytest.fixture(scope="module")
def question_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("question")
    ee.main(cli(tmp_path))
    return tmp_path


def test_the_question_set_alone_writes_its_rows_tables_figure_and_sentence(question_run):
    out = question_run / "exp_e"
    for name in ("question_clean.csv", "question_per_problem.csv", "question_random_rows.csv.gz",
                 "question_timing.csv", "question_per_layer.csv", "question_draws.csv",
                 "question_tests.csv"):
        assert (out / name).is_file(), name
    assert not (out / "per_problem.csv").exists()  # --position-sets question: no last-position rows
    assert (runs.figure_dir(out, question_run / "fig") / "question_sweep.png").is_file()
    table = runs.load_csv(out / "question_per_layer.csv")
    assert set(table.language) == {"en", "zh"} and set(table.layer) == {1, 2}
    assert set(table.condition) == {"none", "full", "z_basis", "z_layer", "random"}
    assert table.noop_max_abs.max() < 1e-4 and (table.n_pairs == 6).all()
    share = table.set_index(["language", "layer", "condition"]).patch_share
    assert np.allclose(share.xs("full", level="condition"), 1)
    assert (share.xs("none", level="condition") == 0).all()
    rows = runs.load_csv(out / "question_per_problem.csv")
    assert list(rows.columns[:8]) == ["k", "layer", "depth", "language", "condition", "draw",
                                      "problem_id", "source_id"]
    assert (rows.source_id == rows.problem_id + "-cf0").all()
    below = table[(table.layer == 1) & (table.condition != "none")]  # below basis layer 2
    assert (below.attn_tv_last > 0).all() and table[table.layer == 2].attn_tv_last.isna().all()
    assert (table[table.condition == "none"].attn_tv_last.fillna(0) == 0).all()
    clean = runs.load_csv(out / "question_clean.csv")
    assert len(clean) == 12 and (clean.answer.astype(str).str[0]
                                 != clean.source_answer.astype(str).str[0]).all()
    tests = runs.load_csv(out / "question_tests.csv")
    assert set(tests.condition) == {"z_basis", "z_layer"} and (tests.p_holm >= tests.p).all()
    lines = summary.summary_lines(out)
    assert len(lines) == 1 and lines[0].startswith("Question positions")
    assert "in English (6 pairs" in lines[0] and "in Chinese (6 pairs" in lines[0]
    assert lines[0].count("Z moves layer 2's attention at the last position") == 2
    assert "nan" not in lines[0]


def test_the_report_reads_a_run_of_the_question_set_alone(question_run, tmp_path):
    """report.py gives a question-only run a verdict and its number (not 'not finished')."""
    import report
    cell = summary.headline(question_run / "exp_e")
    assert cell["verdict"] in ("Z's part of the question: no more than random subspaces",
                               "Z's part of the question above random in English",
                               "Z's part of the question above random in Chinese",
                               "Z's part of the question above random in English and Chinese")
    assert cell["value"].startswith("English (6 pairs): full interchange gives the partner's")
    assert "; Chinese (6 pairs): " in cell["value"]
    text = report.build_report(question_run, tmp_path / "REPORT.md", question_run / "fig")
    assert "not finished" not in text and cell["verdict"] in text


def test_resume_keeps_finished_question_layers_and_replot_rebuilds_them(question_run, tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "exp_e"
    shutil.copytree(question_run / "exp_e", out)
    table = runs.load_csv(out / "question_per_layer.csv")
    before = {name: (out / name).read_bytes() for name in
              ("question_per_layer.csv", "question_draws.csv", "question_tests.csv")}
    runs.write_csv(table[~((table.language == "zh") & (table.layer == 2))],
                   out / "question_per_layer.csv")  # Chinese layer 2 unfinished
    ee.main(cli(tmp_path, "--resume"))
    rows = runs.load_csv(out / "question_per_problem.csv")
    assert not rows.duplicated(["language", "k", "layer", "condition", "problem_id"]).any()
    assert len(runs.load_csv(out / "question_timing.csv")) == 4
    assert len(runs.load_csv(out / "question_per_layer.csv")) == len(table)
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("replot loaded a model"))
    ee.main(ee.parse_args(["--replot", "--out", str(out), "--figures", str(tmp_path / "fig")]))
    for name, data in before.items():
        assert (out / name).read_bytes() == data, name


def test_the_question_set_needs_bank_problems(tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    pairs = [dict(id=f"p{i}", category="t", en=f"Tom has {i + 12} apples.",
                  zh=f"汤姆有{i + 12}个苹果。", answer=i + 12) for i in range(6)]
    prompts.write_text(json.dumps({"templates": {"direct": TEMPLATE}, "pairs": pairs},
                                  ensure_ascii=False), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        runs.run_cli(ee.main, cli(tmp_path, "--prompts", str(prompts)))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "--position-sets question needs the bank" in err and "--prompts bank" in err
    assert not (tmp_path / "exp_e").exists()
    assert question.resolve_positions(None, problems.load_prompts()["pairs"]) == ["last"]
    assert "last position only" in capsys.readouterr().out
    assert question.resolve_positions(None, bank.generate_bank(1)[:3]) == ["last", "question"]
    assert question.resolve_positions(["question", "last"], bank.generate_bank(1)[:3]) == \
        ["last", "question"]


def test_the_sentence_says_down_to_which_layer_the_question_carries_the_answer(tmp_path):
    """From hand-made tables: full interchange moves at least half the pairs up to layer 2 in
    English (0.20 at layer 3) and never half in Chinese; Z of the basis layer carries it in
    English (family-wise Holm p <= 0.05, at least half the pairs), not in Chinese."""
    import pandas as pd
    rows = []
    for language, full in (("en", [1.0, 0.9, 0.6, 0.2, 0.0]), ("zh", [0.4, 0.3, 0.1, 0.0, 0.0])):
        for layer, value in enumerate(full):
            for condition, rate, tv in (("full", value, 0.6), ("z_basis", value / 2 + 0.1, 0.3),
                                        ("random", 0.05, 0.1), ("none", 0.0, 0.0)):
                rows.append(dict(language=language, k=50, layer=layer, condition=condition,
                                 draw=-1, n_pairs=40, top1_src=rate, top1_src_ci_lo=0.0,
                                 top1_src_ci_hi=1.0, top1_src_lo=0.0, top1_src_hi=0.1,
                                 attn_tv_last=tv if layer < 2 else np.nan, attn_tv_last_lo=0.05,
                                 attn_tv_last_hi=0.15, attn_tv_last_p_above=0.02))
    runs.write_csv(pd.DataFrame(rows), tmp_path / "question_per_layer.csv")
    runs.write_json(tmp_path / "config.json", dict(basis_layer=2, primary_layer=1))
    tests = pd.DataFrame([
        dict(language="en", k=50, condition="z_basis", measure="top1_src", scope="best of 5 layers",
             value=0.6, at_layer=0, draws=19, p=0.05, p_holm=0.04),
        dict(language="zh", k=50, condition="z_basis", measure="top1_src", scope="best of 5 layers",
             value=0.3, at_layer=0, draws=19, p=0.4, p_holm=1.0)])
    runs.write_csv(tests, tmp_path / "question_tests.csv")
    runs.write_csv(pd.DataFrame({"language": ["en"] * 40 + ["zh"] * 40,
                                 "source_top1_own": [True] * 38 + [False] * 2 + [True] * 40}),
                   tmp_path / "question_clean.csv")
    text = summary.question_sentence(tmp_path)
    english, chinese = text.split("; in Chinese")
    assert "in English (40 pairs; the partners' own argmax is their first digit on 38)" in english
    assert "on at least half of them up to layer 2 (0.60 [0, 1]; 0.20 at layer 3)" in english
    assert "Z of the basis layer at most 0.60 at layer 0 (random 0.050 [0, 0.10]" in english
    assert "Holm 0.040): carries it, patched at the input of layer 2, Z moves layer 2's " \
        "attention at the last position by a total variation of 0.30 (random 0.10 [0.050, " \
        "0.15]; rank p = 0.020), full 0.60, the no-op 0" in english
    assert "on at most 0.40 of them (layer 0), never half of them" in chinese
    assert "no more than random subspaces" in chinese and "Z of each layer" not in text
    assert summary.question_sentence(tmp_path / "nothing") is None


def test_partners_that_do_not_align_stop_the_run_before_anything_is_written(tmp_path, capsys,
                                                                            monkeypatch):
    """A partner whose prompt is one token longer (as with a tokenizer that merges digits)."""
    def longer(pair, seed):
        return dict(pair, id=pair["id"] + "-cf", en=pair["en"] + " 1", zh=pair["zh"] + "1",
                    answer=pair["answer"] + 100)
    monkeypatch.setattr(bank, "counterfactual", longer)
    with pytest.raises(SystemExit) as exit_info:
        runs.run_cli(ee.main, cli(tmp_path))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "not position-aligned in en" in err and "--position-sets last" in err
    assert not (tmp_path / "exp_e").exists()
