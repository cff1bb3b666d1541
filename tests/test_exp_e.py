"""Experiment E: the suffix-only engine against the full forward, the `last` source's identities,
the transfer fraction's fixed points, splits and partners, bad input, resume, and an end-to-end
sweep on the tiny model with --replot."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import common
from zcausal import conditions, decoding, interchange, runs, stats
from zcausal.summaries import exp_e as summary
from zcausal.summaries import exp_e_tables as tables
import exp_e_layer_sweep as ee
from helpers import smoke_argv

TEXTS = ["Question: Tom buys 3 apples for 4 dollars each. The answer is ",
         "A train goes 60 km. The answer is ",
         "答案是42。一步一步地想。答案是"]
CONTS = [[[5, 7], [9]], [[11], [12, 13, 14]], [[3, 4, 5], [6, 6]]]


def full_forward_scores(model, tok, texts, conts, patch=None):
    """Teacher-forced log p of each continuation set through decoding.generate_and_score (the
    whole prompt, the patch as a hook): (B, R)."""
    ids, mask, _ = common.tokenize_left_padded(tok, texts)
    return torch.stack([decoding.generate_and_score(model, ids, mask, 0, patch=patch,
                                                    score=[[c[r] for c in conts]])["scores"][0]
                        for r in range(len(conts[0]))], 1)


def last_patch(layer, basis, complement, source, width):
    """A SubspacePatch of the last m positions (source (B, m, d)) of prompts left-padded to width."""
    B, m, d = source.shape
    tokens = torch.zeros(B, width, d)
    tokens[:, -m:] = source
    mask = torch.zeros(B, width, dtype=torch.bool)
    mask[:, -m:] = True
    return common.SubspacePatch(layer=max(layer, 0), basis=basis, complement=complement,
                                source_mean=torch.zeros(B, d),
                                patch_generated=torch.zeros(B, dtype=torch.bool),
                                source_tokens=tokens, prompt_mask=mask,
                                site="output" if layer >= 0 else "input")


def engine(model, tok, m, texts=TEXTS, conts=CONTS):
    prefixes = interchange.encode_prefixes(model, interchange.prompt_ids(tok, texts), m)
    block = interchange.build_block(prefixes, list(range(len(texts))), conts)
    with torch.no_grad():
        final, states = interchange.run_layers(model, prefixes, block,
                                               interchange.embed(model, block), 0, capture=True)
    states[-1] = interchange.embed(model, block)
    return prefixes, block, final, states


# ----------------------------------------------------------------------------------------------
# The engine

@pytest.mark.parametrize("m", [1, 3])
def test_suffix_attention_equals_the_full_forwards_attention_at_the_suffix(tiny, m):
    """The basis layer's attention read in the suffix-only engine (clean prefix keys from the
    cache, the suffix's own keys) equals its attention in the whole prompt's forward pass."""
    from zcausal import attention
    model, tok = tiny
    prefixes, block, _, states = engine(model, tok, m)
    ids, mask, _ = common.tokenize_left_padded(tok, TEXTS)
    for layer in range(common.num_layers(model)):
        ours = interchange.suffix_attention(model, prefixes, block, layer, states[layer - 1])
        entering = common.capture_layer_outputs(model, ids, mask, [layer - 1])[layer - 1]
        full = attention.layer_attention(model, layer, entering, mask)[:, :, -m:]
        for b in range(len(TEXTS)):  # both left-padded: the rows' real keys, right-aligned
            n = int(mask[b].sum())
            torch.testing.assert_close(ours[b, :, :, -n:], full[b, :, :, -n:], atol=1e-5, rtol=0)
            assert (ours[b, :, :, :-n] == 0).all()


def test_the_readout_pass_scores_exactly_like_a_single_pass(tiny):
    """run_with_readout splits the query block's pass at the basis layer to read its attention:
    the scores equal patched_scores' bit for bit; a no-op moves no attention."""
    from types import SimpleNamespace
    model, tok = tiny
    d = common.hidden_size(model)
    prefixes, block, _, states = engine(model, tok, 1)
    hidden = {layer: states[layer] for layer in (-1, 0, 1, 2)}
    clean = torch.stack([states[-1]] + [states[layer] for layer in range(4)])  # (L + 1, B, Q, d)
    state = SimpleNamespace(prefixes=prefixes, hidden=clean, languages=None)
    batch = SimpleNamespace(block=block, columns=torch.arange(block.width)[None].repeat(3, 1),
                            mask=interchange.attention_mask(prefixes, block, torch.float32))
    source = torch.randn(3, 1, d, generator=torch.Generator().manual_seed(3)) * 3
    basis = common.random_basis(d, 8, 2)[None].repeat(3, 1, 1)
    for layer in (0, 1, 2):
        for complement in (False, True):
            patch = interchange.subspace_patch(basis, torch.full((3,), complement), source)
            with torch.no_grad():
                want = interchange.patched_scores(model, prefixes, block, layer, hidden[layer],
                                                  patch, None, batch.mask)
                got, tv_last, tv_all = ee.run_with_readout(model, state, batch, layer,
                                                           hidden[layer], patch, basis_layer=2)
            for key in ("logp", "top1"):
                assert torch.equal(got[key], want[key])
            if layer + 1 > 2:  # a patch at or above the basis layer cannot reach its attention
                assert tv_last.isnan().all() and tv_all.isnan().all()
            else:
                assert torch.equal(tv_last, tv_all) and (tv_last > 0).all()  # m = 1: one row
    noop = interchange.subspace_patch(torch.zeros(3, 8, d), torch.zeros(3, dtype=torch.bool),
                                      source)
    _, tv_last, _ = ee.run_with_readout(model, state, batch, 1, hidden[1], noop, basis_layer=2)
    assert (tv_last == 0).all()


def test_clean_query_block_scores_equal_the_full_forward(tiny):
    model, tok = tiny
    _, block, final, _ = engine(model, tok, 2)
    with torch.no_grad():
        fast = interchange.score(model, final, block)["logp"]
    assert torch.allclose(fast, full_forward_scores(model, tok, TEXTS, CONTS), atol=1e-4)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("layer", [-1, 0, 2, 3])
def test_suffix_only_recomputation_equals_the_full_forward(tiny, m, layer):
    """float32: patching the last m positions at `layer` and recomputing only the query block
    above it gives the full forward's log-probabilities (left-padded prompts of three lengths,
    one row each of subspace, full and no-op patching)."""
    model, tok = tiny
    d = common.hidden_size(model)
    prefixes, block, _, states = engine(model, tok, m)
    gen = torch.Generator().manual_seed(layer + 10)
    source = torch.randn(3, m, d, generator=gen) * 2
    basis = torch.stack([common.random_basis(d, 8, 1), torch.zeros(8, d), torch.zeros(8, d)])
    complement = torch.tensor([False, True, False])
    with torch.no_grad():
        fast = interchange.patched_scores(model, prefixes, block, layer, states[layer],
                                          interchange.subspace_patch(basis, complement, source))
    width = common.tokenize_left_padded(tok, TEXTS)[0].shape[1]
    full = full_forward_scores(model, tok, TEXTS, CONTS,
                               last_patch(layer, basis, complement, source, width))
    assert torch.allclose(fast["logp"], full, atol=1e-4)
    clean = full_forward_scores(model, tok, TEXTS, CONTS)
    assert torch.allclose(full[2], clean[2], atol=1e-5)  # the no-op row
    assert (full[:2] - clean[:2]).abs().max() > 1e-2  # the others moved


def test_last_source_from_the_own_prompt_leaves_the_logits_unchanged(tiny):
    model, tok = tiny
    layer, m = 1, 2
    ids, mask, _ = common.tokenize_left_padded(tok, TEXTS)
    own = common.capture_layer_outputs(model, ids, mask, [layer])[layer][:, -m:].float()
    d = common.hidden_size(model)
    patch = last_patch(layer, torch.zeros(3, 4, d), torch.ones(3, dtype=torch.bool), own,
                       ids.shape[1])
    with torch.no_grad():
        clean = model(input_ids=ids, attention_mask=mask,
                      position_ids=common.position_ids_from_mask(mask)).logits
        with common.layer_output_hook(model, layer, patch):
            patched = model(input_ids=ids, attention_mask=mask,
                            position_ids=common.position_ids_from_mask(mask)).logits
    assert torch.equal(clean, patched)
    prefixes, block, final, states = engine(model, tok, m)
    with torch.no_grad():
        fast = interchange.patched_scores(
            model, prefixes, block, layer, states[layer],
            interchange.subspace_patch(torch.zeros(3, 4, d), torch.ones(3, dtype=torch.bool),
                                       states[layer][:, :m].float()))
        assert torch.allclose(fast["logp"], interchange.score(model, final, block)["logp"],
                              atol=1e-5)


def test_k_equal_to_d_subspace_patch_equals_full_replacement(tiny):
    model, tok = tiny
    d = common.hidden_size(model)
    prefixes, block, _, states = engine(model, tok, 1)
    source = torch.randn(3, 1, d) * 2
    everything = common.random_basis(d, d, 3).expand(3, -1, -1)
    with torch.no_grad():
        subspace = interchange.patched_scores(
            model, prefixes, block, 1, states[1],
            interchange.subspace_patch(everything, torch.zeros(3, dtype=torch.bool), source))
        full = interchange.patched_scores(
            model, prefixes, block, 1, states[1],
            interchange.subspace_patch(torch.zeros(3, 1, d), torch.ones(3, dtype=torch.bool), source))
    assert torch.allclose(subspace["logp"], full["logp"], atol=1e-4)


# ----------------------------------------------------------------------------------------------
# The transfer fraction

def equal_length_pairs(tok):
    """Two English questions of the same token length, each its own 'Chinese' prompt."""
    candidates = ["Tom has 3 apples.", "Tom has 5 apples.", "Sam has 4 pears.", "Ann has 7 eggs."]
    lengths = {t: len(tok(t, add_special_tokens=False)["input_ids"]) for t in candidates}
    a = candidates[0]
    b = next(t for t in candidates[1:] if lengths[t] == lengths[a])
    return [{"id": "a", "en": a, "zh": a, "answer": 12}, {"id": "b", "en": b, "zh": b, "answer": 47}]


def test_transfer_is_zero_for_a_noop_and_one_when_the_patched_run_is_the_target_run(tiny):
    """Full replacement of every prompt position at the embeddings by the partner prompt's
    embeddings makes the patched run the partner's unpatched run: ld_patched = ld_target, and
    the patched first-digit scores are the partner's clean ones."""
    model, tok = tiny
    pairs = equal_length_pairs(tok)
    template = {"en": "{question}", "zh": "{question}"}
    T = len(tok(pairs[0]["en"], add_special_tokens=False)["input_ids"])
    state = ee.prepare(model, tok, pairs, template, [1, 0], T, 4)
    conditions = ee.make_conditions(common.hidden_size(model), 4, [], 0, 0)
    batches = ee.make_batches(state, [0, 1], 2, 8, torch.float32)
    rows = ee.per_problem_rows(ee.run_rows(model, state, -1, conditions, batches), state,
                               conditions, ["train", "train"], {"k": 4, "layer": -1})
    measured = tables.row_measures(rows, state.clean, min_span=0.1)
    swap = measured[measured.pairing == "swap"].set_index("condition")
    assert np.all(np.abs(state.clean.ld_target - state.clean.ld_clean) >= 0.1)
    assert np.allclose(swap.loc["full", "transfer"], 1, atol=1e-4)
    assert np.allclose(swap.loc["none", "transfer"], 0, atol=1e-5)
    assert np.allclose(swap.loc["full", "ld_shift"], swap.loc["full", "ld_span"], atol=1e-4)
    assert np.allclose(swap.loc["none", "p_share_shift"], 0, atol=1e-6)
    assert not swap.loc["none", "low_mass"].any()
    same_full = measured[(measured.pairing == "same") & (measured.condition == "full")]
    assert np.allclose(same_full.dlogp_own, 0, atol=1e-5)  # own states in: nothing moves


def hand_rows():
    """Two problems (answers 12 and 47, partners of each other) and one of answer 15 whose
    partner (answer 12) shares its first digit; clean and patched first-digit log-probs chosen
    by hand."""
    import pandas as pd
    ln = np.log
    clean = pd.DataFrame({
        "problem_id": ["a", "b", "c"], "answer": [12, 47, 15], "source_answer": [47, 12, 12],
        "logp_own": [-1.0, -2.0, -1.0], "logp_src": [-5.0, -4.0, -3.0],
        "ld_clean": [4.0, 2.0, 2.0], "ld_target": [-3.0, 1.5, 0.0],
        "first_own": [ln(0.6), ln(0.5), ln(0.5)], "first_src": [ln(0.2), ln(0.1), ln(0.3)],
        "ld_first_clean": [ln(3), ln(5), ln(5 / 3)], "ld_first_target": [-1.0, -3.0, 0.0],
        "lang_own": [2.0, 1.0, 1.0]})
    rows = pd.DataFrame({
        "k": 4, "layer": 2, "draw": -1, "condition": "z_basis",
        "problem_id": ["a", "a", "b", "c"], "pairing": ["same", "swap", "swap", "swap"],
        "logp_own": [-1.5, -2.0, -2.0, -1.0], "logp_src": [-1.5, -3.0, -4.0, -3.0],
        # a/swap: p_own 0.2, p_src 0.6 (share 0.75, mass 0.8 of 0.8); b/swap: 0.1, 0.1 (mass
        # 0.2 of 0.6: below half); a/same: p_own 0.2 of 0.6 (below half)
        "first_own": [ln(0.2), ln(0.2), ln(0.1), ln(0.5)],
        "first_src": [ln(0.2), ln(0.6), ln(0.1), ln(0.3)],
        "lang_own": [2.0, 1.0, 0.5, 1.0], "lang_src": 0.0, "top1": 0,
        "top1_own": [False, False, False, True], "top1_src": [False, True, False, False],
        "patch_share": 0.5})
    return clean, rows


def test_row_measures_and_group_table_against_hand_computation():
    clean, rows = hand_rows()
    m = tables.row_measures(rows, clean, min_span=1.0)
    assert m.in_set.tolist() == [True, True, True, False]  # c's partner shares its first digit
    assert m.dlogp_own.tolist() == [-0.5, -1.0, 0.0, 0.0]
    assert m.dlogp_src.tolist() == [-0.5, 2.0, 0.0, 0.0]  # same: the source's answer is the own
    assert m.p_share.iloc[1] == pytest.approx(0.75) and m.p_share_clean.iloc[1] == pytest.approx(0.25)
    assert m.p_share.iloc[2] == pytest.approx(0.5) and np.isnan(m.p_share.iloc[0])
    assert m.low_mass.tolist() == [True, False, True, False]
    assert m.neither.tolist() == [True, False, True, False]
    assert m.transfer[1] == pytest.approx((1 - 4) / (-3 - 4))
    assert np.isnan(m.transfer[2])  # |span| 0.5 < --min-span: out of the old mean of ratios
    g = tables.group_table(m).set_index("pairing")
    swap, same = g.loc["swap"], g.loc["same"]
    assert (swap.n_rows, swap.n_pairs, swap.n_transfer) == (3, 2, 1)
    assert (swap.top1_src, swap.top1_own, swap.neither) == (0.5, 0, 0.5)
    assert swap.p_share_shift == pytest.approx(np.mean([0.75 - 0.25, 0.5 - 1 / 6]))
    assert swap.low_mass == 0.5 and not swap.disrupts  # half the pairs is not most of them
    # pooled: mean shift / mean span over the same two pairs, no span threshold
    assert swap.transfer_pooled == pytest.approx(np.mean([-3, 0]) / np.mean([-7, -0.5]))
    assert np.isnan(same.top1_src) and same.low_mass == 1 and same.disrupts
    ci = tables.with_intervals(g.reset_index()).set_index("pairing").loc["swap"]
    assert (ci.top1_src_ci_lo, ci.top1_src_ci_hi) == pytest.approx(stats.wilson_interval(1, 2))


def test_a_disrupting_condition_is_said_as_disruption_never_as_transfer():
    clean, rows = hand_rows()
    rows = rows.assign(condition="full", first_own=np.log(0.01), first_src=np.log(0.01),
                       top1_src=[False, True, True, True])
    per_layer = tables.group_table(tables.row_measures(rows, clean))
    assert per_layer.set_index("pairing").loc["swap", "disrupts"]
    text = summary.disruption_sentence(per_layer, 4)
    assert text.startswith("Disrupts") and "full at layer 2" in text


# ----------------------------------------------------------------------------------------------
# The tests: family-wise over layers, the profile sentence

def test_best_layer_test_keeps_its_false_positive_rate_when_z_is_one_more_draw():
    """Z one more of 20 exchangeable subspaces, each with the same effect at every layer plus
    noise (layers strongly correlated): the family-wise test rejects about 5% of the time,
    while "Z above every draw at some layer" rejects far more often."""
    rng = np.random.default_rng(0)
    sims, m, n_layers = 3000, 19, 12
    family, naive = [], []
    for _ in range(sims):
        values = rng.normal(size=(m + 1, 1)) + 0.7 * rng.normal(size=(m + 1, n_layers)) \
            + np.linspace(0, 2, n_layers)  # a layer profile shared by every subspace
        z, draws = values[0], values[1:]
        family.append(tables.best_layer_test(z, draws)["p_above"] <= 0.05)
        naive.append(np.any(z > draws.max(0)))
    assert 0.035 < np.mean(family) < 0.065
    assert np.mean(naive) > 0.15
    discrete = np.round(values * 2) / 2  # ties count against Z: never above the level
    assert tables.best_layer_test(discrete[0], discrete[1:])["p_above"] >= 1 / 20


def test_best_layer_test_needs_draws_that_vary_over_the_layers_as_z_does():
    """z_layer is another subspace at every layer: under the null its values are independent
    over the layers. Against draws shared by the layers (each draw's values correlated over them,
    so its maximum is small) the family-wise test then rejects far above 5%; against draws made
    independently at every layer (--random-draws per-layer) it keeps its level."""
    rng = np.random.default_rng(1)
    sims, m, n_layers = 2000, 19, 12
    shared, per_layer = [], []
    for _ in range(sims):
        z = rng.normal(size=n_layers)
        same = rng.normal(size=(m, 1)) + 0.1 * rng.normal(size=(m, n_layers))
        shared.append(tables.best_layer_test(z, same)["p_above"] <= 0.05)
        fresh = rng.normal(size=(m, n_layers))
        per_layer.append(tables.best_layer_test(z, fresh)["p_above"] <= 0.05)
    assert np.mean(shared) > 0.2  # 0.29 here: six times the level
    assert 0.03 < np.mean(per_layer) < 0.07


def test_per_layer_draws_differ_by_layer_and_shared_draws_do_not():
    from zcausal.interchange import make_conditions
    one = make_conditions(16, 3, [], 2, 0, layer=1).bases
    assert torch.equal(one, make_conditions(16, 3, [], 2, 0, layer=1).bases)  # seeded
    assert not torch.allclose(one[2:], make_conditions(16, 3, [], 2, 0, layer=2).bases[2:])
    shared = make_conditions(16, 3, [], 2, 0).bases
    assert torch.equal(shared, make_conditions(16, 3, [], 2, 0, layer=None).bases)
    draw = shared[2]  # Haar draws: orthonormal rows
    assert torch.allclose(draw @ draw.T, torch.eye(3), atol=1e-6)
    args = SimpleNamespace(random_draws="shared", out="x", resume=False)
    assert conditions.draws_layer(args, 5) is None
    assert conditions.draws_layer(SimpleNamespace(random_draws="per-layer"), 5) == 5


def test_best_layer_test_without_draws_is_not_tested():
    assert tables.best_layer_test(np.array([0.1, 0.2]), np.empty((0, 2))) == {}


def test_profile_sentence_says_where_full_interchange_moves_the_first_digit():
    import pandas as pd
    values = [0.0] * 13 + [0.2, 0.6, 0.9] + [1.0] * 8
    per_layer = pd.DataFrame({"k": 50, "layer": range(24), "pairing": "swap", "condition": "full",
                              "top1_src": values, "n_pairs": 44,
                              "top1_src_ci_lo": 0.0, "top1_src_ci_hi": 1.0})
    text = summary.profile_sentence(per_layer, 50)
    assert text.startswith("Full interchange transfers most at layer 16")
    assert "0 at layers 0-12, at most 0.20 at layers 13;" not in text
    assert "; 0 at layers 0-12, at most 0.20 at layer 13, at least half from layer 14 (0.60)" \
        in text  # one layer is "layer 13", never "layers 13"
    assert "0.90 to 1 at layers 15-23" in text and "of 44 pairs" in text
    one = summary.profile_sentence(per_layer.assign(n_pairs=1), 50)
    assert "of 1 pair;" in one and "1 pairs" not in one
    assert summary.layer_list([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    never = summary.profile_sentence(per_layer.assign(top1_src=0.0), 50)
    assert never.startswith("Full interchange never makes") and "transfers most" not in never


# ----------------------------------------------------------------------------------------------
# Splits, partners, answer tokens

def test_splits_are_seeded_and_partners_stay_in_their_split():
    pairs = [{"id": str(i), "answer": i % 10} for i in range(20)]  # each answer twice
    split = ee.make_splits(20, [0.5, 0.25, 0.25], 3)
    assert split == ee.make_splits(20, [0.5, 0.25, 0.25], 3)
    assert split != ee.make_splits(20, [0.5, 0.25, 0.25], 4)
    assert [split.count(s) for s in ("train", "validation", "test")] == [10, 5, 5]
    partner = ee.swap_partners(pairs, split, 0)
    for i, j in enumerate(partner):
        assert j != i and split[j] == split[i]
        assert pairs[j]["answer"] != pairs[i]["answer"]
    assert sorted(partner) == list(range(20))  # a permutation: every problem is one source
    with pytest.raises(runs.UsageError, match="at least 2 problems"):
        ee.split_sizes(5, [0.5, 0.25, 0.25])


@pytest.mark.parametrize("n,sizes", [(300, (210, 30, 60)), (150, (85, 15, 50)),
                                     (100, (45, 10, 45)), (20, (9, 2, 9))])
def test_the_test_split_takes_problems_from_train_until_it_holds_das_test_min(n, sizes):
    """--das-test-min 50 with the default --split: 300 kept pairs give DAS 210 training
    problems and 60 test pairs; fewer move problems from train to test while train keeps at
    least as many as test; --das-test-min 0 leaves the fractions alone."""
    fractions = ee.build_parser().get_default("split")
    assert ee.split_sizes(n, fractions, 50) == sizes
    split = ee.make_splits(n, fractions, 0, 50)
    assert tuple(split.count(s) for s in ("train", "validation", "test")) == sizes
    train, val, test = ee.split_sizes(n, fractions, 0)
    assert (val, test) == (max(2, round(0.1 * n)), max(2, round(0.2 * n)))


def test_answer_tokens_on_the_real_qwen_tokenizer():
    """The token facts the sweep relies on (skipped where the real model is not on disk)."""
    path = Path.home() / ".cache/real-models/qwen2.5-coder-0.5b-instruct"
    if not path.is_dir():
        pytest.skip("real Qwen tokenizer not available")
    from transformers import AutoTokenizer
    from zcausal import problems
    tok = AutoTokenizer.from_pretrained(path)
    template = problems.load_prompts()["templates"]["direct"]
    for lang in ("en", "zh"):
        prompt = problems.format_prompt(template[lang], "Q?")[0]
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids[-1:]) == " "  # the same last token in both languages
        digits = ee.answer_ids(tok, 605)
        assert [tok.decode([i]) for i in digits] == ["6", "0", "5"]
        assert tok(prompt + "605", add_special_tokens=False)["input_ids"] == ids + digits
    from zcausal import bank
    assert problems.aligned_ends(tok, template, bank.generate_bank(1)[:200]) == []
    classes = common.LanguageClasses(tok)
    for word, latin in ((" eggs", True), (" minutes", True), (" 颗", False), ("个", False)):
        first = tok(word, add_special_tokens=False)["input_ids"][0]
        assert (bool(classes.latin[first]), bool(classes.cjk[first])) == (latin, not latin), word
    assert tok.decode([classes.space_id]) == " "  # "60 个": 6, 0, " ", 个


# ----------------------------------------------------------------------------------------------
# The command line

def write_prompts(path, n=8):
    en = "Tom has {a} apples and buys {b} more. How many apples does he have?"
    zh = "小明有{a}个苹果，又买了{b}个。他现在有多少个苹果？"
    pairs = [{"id": f"p{i}", "category": "t", "en": en.format(a=i + 2, b=3 * i + 1),
              "zh": zh.format(a=i + 2, b=3 * i + 1), "answer": 4 * i + 3} for i in range(n)]
    data = {"templates": {"direct": {"en": "Question: {question}\nAnswer: The answer is ",
                                     "zh": "问题：{question}\n答案：答案是 "}}, "pairs": pairs}
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def cli(tmp_path, *extra, layer=("--layer", "2")):
    prompts = tmp_path / "prompts.json"
    if not prompts.exists():
        write_prompts(prompts)
    return ee.parse_args(["--model", common.TINY_MODEL, "--device", "cpu", "--prompts",
                          str(prompts), "--solved", "off", "--min-pairs", "6", *layer,
                          "--k", "4", "6", "--n-random", "3",
                          "--decode-limit", "2", "--decode-random", "1", "--das-k", "2", "4",
                          "--das-steps", "2", "--das-eval-every", "1", "--max-new-tokens", "4",
                          "--das-test-min", "0", "--out", str(tmp_path / "exp_e"),
                          "--figures", str(tmp_path / "fig"), *extra])


OUTPUTS = ["clean.csv", "per_layer.csv", "draws.csv", "per_problem.csv", "random_rows.csv.gz",
           "timing.csv", "tests.csv", "decode.csv", "decode_summary.csv", "das.csv",
           "das_per_problem.csv", "das_random_rows.csv.gz", "das_angles.csv", "das_training.csv",
           "das_decode.csv", "das_decode_summary.csv", "config.json"]
TABLES = ["per_layer.csv", "draws.csv", "das.csv", "tests.csv"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sweep")
    args = cli(tmp_path)
    ee.main(args)
    return tmp_path, args


def test_sweep_writes_every_output_and_the_figures(finished_run):
    tmp_path, args = finished_run
    out = tmp_path / "exp_e"
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    figures = runs.figure_dir(out, tmp_path / "fig")
    for name in ("layer_sweep.png", "layer_sweep_k4.png", "das_curve.png"):  # k 6: primary
        assert (figures / name).is_file(), name
    per_layer = runs.load_csv(out / "per_layer.csv")
    assert sorted(per_layer.layer.unique()) == [0, 1, 2, 3]
    assert sorted(per_layer.k.unique()) == [4, 6]
    assert set(runs.load_csv(out / "per_problem.csv").k) == {4, 6}
    assert set(per_layer.condition) == {"none", "full", "z_basis", "z_layer", "random"}
    assert per_layer.noop_max_abs.max() < 1e-4  # the no-op rows reproduce the clean run
    share = per_layer.groupby("condition").patch_share
    assert np.allclose(share.min()["full"], 1) and np.allclose(share.max()["full"], 1)
    assert share.max()["none"] == 0 and 0 < share.mean()["random"] < 1
    layer2 = per_layer[(per_layer.layer == 2) & (per_layer.pairing == "swap")
                       & (per_layer.k == 6)].set_index("condition")
    for measure in ("top1_src", "p_share_shift", "transfer_pooled", "dlang_own"):
        assert layer2.loc["z_basis", measure] == pytest.approx(layer2.loc["z_layer", measure])
        assert layer2.loc["random", f"{measure}_lo"] <= layer2.loc["random", measure] <= \
            layer2.loc["random", f"{measure}_hi"]
    assert (per_layer.n_pairs <= per_layer.n_rows).all()
    assert (per_layer[per_layer.pairing == "same"].n_pairs == 8).all()
    draws = runs.load_csv(out / "draws.csv")
    assert len(draws) == 2 * 4 * 2 * 3  # k x layers x pairings x draws
    decode = runs.load_csv(out / "decode_summary.csv")
    assert decode.fast_vs_full_max_abs.max() < 1e-3  # the engine agrees with generate_and_score
    config = json.loads((out / "config.json").read_text())
    assert sum(len(v) for v in config["splits"].values()) == 8
    assert config["basis_layer"] == 2
    assert config["das_layers"][0] == 1  # the input of the basis layer first, then ...
    assert config["das_layers"][1:] == [ee.tables.carried_layer(out)[0]]  # ... where full carries
    assert "k = 6" in config["primary_test"] and "top1_src" in config["primary_test"]
    assert "/tmp" not in json.dumps(config["args"])
    angles = runs.load_csv(out / "das_angles.csv")
    assert set(angles.versus) == {"z_basis", "z_layer", "random"}
    assert set(zip(angles.layer, angles.k)) == {(layer, k) for layer in config["das_layers"]
                                               for k in (2, 4)}
    assert np.allclose(angles.chance_mean_cos2, angles.k / 64)
    for layer in config["das_layers"]:
        assert np.load(out / f"das_basis_L{layer}_k4.npy").shape == (4, 64)


def test_das_curve_runs_over_several_k_and_two_layers(finished_run):
    """The DAS curve on the tiny model: every (layer, k) trained once and measured on the test
    pairs beside full, Z and the random draws; one summary sentence per DAS layer, the basis
    layer's input named as such."""
    out = finished_run[0] / "exp_e"
    config = json.loads((out / "config.json").read_text())
    layers = config["das_layers"]
    assert len(layers) == 2
    table = runs.load_csv(out / "das.csv")
    swap = table[table.pairing == "swap"]
    assert set(zip(swap.layer, swap.k)) == {(layer, k) for layer in layers for k in (2, 4)}
    for (layer, k), rows in swap.groupby(["layer", "k"]):
        assert set(rows.condition) == {"none", "full", "das", "z_basis", "z_layer", "random"}
        named = rows[rows.condition != "random"]
        for name in ("top1_src", "top1_own", "neither"):
            assert (named[f"{name}_ci_lo"] <= named[name]).all()
            assert (named[name] <= named[f"{name}_ci_hi"]).all()
    training = runs.load_csv(out / "das_training.csv")
    assert len(training) == 2 * 2 * 3  # layers x k x evaluations at steps 0, 1, 2
    lines = [l for l in summary.summary_lines(out) if l.startswith("DAS at")]
    assert len(lines) == 2
    assert lines[0].startswith("DAS at the input of layer 2, the basis layer (layer 1's output)")
    assert "at k = 2" in lines[0] and "at k = 4" in lines[0] and "mean cos²" in lines[0]
    assert "top1_own" in lines[0] and "neither" in lines[0] and "p_share shift" in lines[0]
    assert "DAS moves layer 2's attention at the last position" in lines[0]  # below layer 2
    assert (swap.site[swap.layer == 1] == "output of layer 1 = input of layer 2").all()
    table = table.set_index(["layer", "k", "pairing", "condition"])
    for line, layer in zip(lines, layers):  # the largest k says whether the control works here
        carried = table.loc[(layer, 4, "swap", "das"), "top1_src"] > 0.5
        assert ("the positive control works at this layer" in line) == carried
        assert ("a null for Z cannot be read as Z in particular" in line) == (not carried)


def copy_run(finished_run, tmp_path):
    """A copy of the finished run's folder (tests below change files in it)."""
    import shutil
    shutil.copytree(finished_run[0] / "exp_e", tmp_path / "exp_e")
    return tmp_path / "exp_e"


def replot(out, figures):
    return ee.main(ee.parse_args(["--replot", "--out", str(out), "--figures", str(figures)]))


def test_replot_reproduces_every_table_the_run_wrote(finished_run, tmp_path, monkeypatch,
                                                     capsys):
    out = copy_run(finished_run, tmp_path)
    before = {name: (out / name).read_bytes()
              for name in TABLES + ["decode_summary.csv", "das_decode_summary.csv"]}
    for name in before:
        (out / name).unlink()
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("replot loaded a model"))
    replot(out, tmp_path / "fig")
    printed = capsys.readouterr().out
    for name, data in before.items():
        if name == "decode_summary.csv":  # its fast-vs-full column is the run's, not the rows'
            continue
        assert (out / name).read_bytes() == data, name
        assert f"wrote {out / name}" in printed
    figures = runs.figure_dir(out, tmp_path / "fig")
    for name in ("layer_sweep.png", "layer_sweep_k4.png", "das_curve.png"):
        assert (figures / name).is_file() and f"wrote {figures / name}" in printed
    assert "Primary test: " in printed and "Exploratory run" in printed  # a finished sweep


def test_replot_of_a_folder_without_a_run_writes_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        runs.run_cli(ee.main, ee.parse_args(["--replot", "--out", str(tmp_path / "empty"),
                                             "--figures", str(tmp_path / "fig")]))
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err
    assert not any((tmp_path / "empty").iterdir()) and not (tmp_path / "fig").exists()


def test_replot_reads_a_run_from_before_several_das_layers(finished_run, tmp_path, capsys):
    """A run whose DAS files have no layer column (one DAS layer, config.json's das_layer),
    angles called overlap / chance_overlap and bases das_basis_k<k>.npy: --replot rebuilds
    das.csv keyed by (layer, k), draws das_curve.png and says DAS at that layer."""
    out = copy_run(finished_run, tmp_path)
    config = json.loads((out / "config.json").read_text())
    layer = config["das_layers"][0]
    for name in ("das_per_problem.csv", "das_random_rows.csv.gz", "das_angles.csv",
                 "das_training.csv"):
        frame = runs.load_csv(out / name)
        frame = frame[frame.layer == layer].drop(columns="layer")
        runs.write_csv(frame.rename(columns={"mean_cos2": "overlap",
                                             "chance_mean_cos2": "chance_overlap"}), out / name)
    for path in out.glob("das_basis_L*_k*.npy"):
        path.unlink()
    (out / "das.csv").unlink()
    old = {key: value for key, value in config.items() if key not in ("das_layers",
                                                                      "das_layer_reasons")}
    runs.write_json(out / "config.json", dict(old, das_layer=layer))
    replot(out, tmp_path / "fig")
    printed = capsys.readouterr().out
    table = runs.load_csv(out / "das.csv")
    assert set(table.layer) == {layer} and set(table.k) == {2, 4}
    assert (runs.figure_dir(out, tmp_path / "fig") / "das_curve.png").is_file()
    line = next(l for l in printed.splitlines() if l.startswith("DAS at"))
    assert line.startswith("DAS at the input of layer 2") and "mean cos²" in line


def test_tests_csv_holds_the_primary_test_and_holm_adjusted_secondary_tests(finished_run):
    out = finished_run[0] / "exp_e"
    tests = runs.load_csv(out / "tests.csv")
    primary = tests[tests.family == "primary"]
    assert list(primary.measure) == ["top1_src", "p_share_shift", "top1_src and p_share_shift"]
    # --site input (the default): Z of basis layer 2 is read where layer 2's heads read it, the
    # output of layer 1
    assert set(primary.k) == {6} and set(primary.layer) == {1}
    assert primary.p.iloc[2] == max(primary.p.iloc[:2])  # intersection-union
    secondary = tests[tests.family == "secondary"]
    assert (secondary.p_holm >= secondary.p - 1e-12).all() and primary.p_holm.isna().all()
    config = json.loads((out / "config.json").read_text())
    assert config["site"] == "input" and config["primary_layer"] == 1
    sweep = runs.load_csv(out / "per_layer.csv")
    assert (sweep[sweep.layer == 1].site == "output of layer 1 = input of layer 2").all()
    # Z's own positive control: the basis layer's attention, below it only; the no-op moves none
    below, above = sweep[sweep.layer < 2], sweep[sweep.layer >= 2]
    assert below.attn_tv_last.notna().all() and above.attn_tv_last.isna().all()
    # the no-op is exactly 0 at the basis layer's input; lower down, the query block runs the
    # layers between in other batch shapes than the clean pass did: float32 noise, the floor
    none = below[below.condition == "none"]
    assert (none[none.layer == 1].attn_tv_last == 0).all() and (none.attn_tv_last < 1e-5).all()
    assert (below[below.condition == "full"].attn_tv_last > 0).all()
    assert "Z's own positive control" in " ".join(summary.summary_lines(out))
    assert set(secondary.condition) == {"z_basis", "z_layer"}
    control = tests[tests.family == "control"]  # DAS, Holm-adjusted among themselves
    assert set(control.condition) == {"das"} and len(control) == 2 * 2 * 2  # layer x k x measure
    assert (control.p_holm >= control.p - 1e-12).all()
    best = secondary[secondary.scope.str.startswith("best of")]
    assert len(best) == 2 * 2 * 2 and best.at_layer.between(0, 3).all()  # k x condition x measure
    per_layer = runs.load_csv(out / "per_layer.csv")
    z = per_layer[(per_layer.condition == "z_basis") & (per_layer.pairing == "swap")
                  & (per_layer.k == 6)]
    row = best[(best.condition == "z_basis") & (best.k == 6) & (best.measure == "p_share_shift")]
    assert row.value.iloc[0] == pytest.approx(z.p_share_shift.max())


def test_headline_is_a_dict_read_from_the_primary_test(finished_run):
    head = summary.headline(finished_run[0] / "exp_e")
    assert set(head) == {"verdict", "value", "lead"}
    assert head["verdict"].startswith(("no transfer (0 of", "not above random (one-sided p",
                                       "Z transfers", "Z disrupts"))
    assert head["value"].startswith("top1_src ") and " vs random " in head["value"]
    assert head["lead"][0].startswith("Full interchange") and 1 <= len(head["lead"]) <= 3
    text = " ".join(summary.summary_lines(finished_run[0] / "exp_e"))
    assert "nan" not in text and " 1 pairs" not in text


def test_das_rows_have_bootstrap_intervals_and_say_a_small_test_split(finished_run):
    out = finished_run[0] / "exp_e"
    das_table = runs.load_csv(out / "das.csv")
    swap = das_table[das_table.pairing == "swap"].set_index("condition")
    assert set(swap.index) == {"none", "full", "das", "z_basis", "z_layer", "random"}
    assert swap.too_small.all() and (swap.n_train == 4).all()
    assert "train split of 4 problems (fewer than 200)" in swap.note.iloc[0]
    for layer, k in {(int(a), int(b)) for a, b in zip(swap.layer, swap.k)}:
        mine = swap[(swap.layer == layer) & (swap.k == k)]
        for name in ("full", "das", "z_basis"):
            lo, hi = mine.loc[name, ["p_share_shift_boot_lo", "p_share_shift_boot_hi"]]
            assert lo <= mine.loc[name, "p_share_shift"] <= hi
        assert mine.loc["das", "das_minus_full_p_share_shift"] == pytest.approx(
            mine.loc["das", "p_share_shift"] - mine.loc["full", "p_share_shift"])
    line = next(l for l in summary.summary_lines(out) if l.startswith("DAS at"))
    assert "too small for this reading" in line and "bootstrap over the test problems" in line


def test_no_random_draws_are_said_as_not_tested(tmp_path):
    """--n-random 0: the run, its tables, figures and every sentence without a band or a test."""
    ee.main(cli(tmp_path, "--n-random", "0", "--decode-random", "0", "--k", "4",
                "--layers", "1", "2"))
    out = tmp_path / "exp_e"
    figures = runs.figure_dir(out, tmp_path / "fig")
    assert (figures / "layer_sweep.png").is_file() and (figures / "das_curve.png").is_file()
    lines = summary.summary_lines(out)
    text = " ".join(lines)
    assert summary.NOT_TESTED in lines[1] and "Z ranks" not in text and "nan" not in text
    assert "against random draws: not tested (no random draws)." in text
    assert summary.headline(out)["verdict"] == summary.NOT_TESTED
    tests = runs.load_csv(out / "tests.csv")
    assert (tests.draws == 0).all() and not tests.significant.astype(bool).any()
    assert "random" not in set(runs.load_csv(out / "per_layer.csv").condition)


def test_resume_finishes_an_interrupted_run_without_duplicates(finished_run, tmp_path,
                                                               monkeypatch):
    """An interrupted sweep and DAS: only the unfinished layer and (DAS layer, k) run again, and
    what they add equals what the uninterrupted run wrote."""
    import shutil
    source, args = finished_run
    out = tmp_path / "exp_e"
    shutil.copytree(source / "exp_e", out)
    before = {name: (out / name).read_bytes() for name in ("das.csv", "das_training.csv",
                                                            "das_angles.csv")}
    per_layer = runs.load_csv(out / "per_layer.csv")
    runs.write_csv(per_layer[per_layer.layer < 3], out / "per_layer.csv")  # layer 3 unfinished
    last = json.loads((out / "config.json").read_text())["das_layers"][-1]
    for name in ("das.csv", "das_per_problem.csv", "das_random_rows.csv.gz"):
        frame = runs.load_csv(out / name)  # DAS at the last layer, k = 4: trained, not measured
        runs.write_csv(frame[(frame.layer != last) | (frame.k == 2)], out / name)
    trained = []
    train = ee.das.train_das
    monkeypatch.setattr(ee.das, "train_das", lambda model, state, data, k, *a, **kw: (
        trained.append((data.layer, k)), train(model, state, data, k, *a, **kw))[1])
    resumed = ee.parse_args([a if a != str(source / "exp_e") else str(out)
                             for a in _argv(args)] + ["--resume"])
    ee.main(resumed)
    assert trained == [(last, 4)]
    assert len(runs.load_csv(out / "per_layer.csv")) == len(per_layer)
    assert len(runs.load_csv(out / "draws.csv")) == 2 * 4 * 2 * 3
    problems_rows = runs.load_csv(out / "per_problem.csv")
    assert not problems_rows.duplicated(["k", "layer", "pairing", "condition", "problem_id"]).any()
    assert len(runs.load_csv(out / "timing.csv")) == 2 * 4
    das_rows = runs.load_csv(out / "das_per_problem.csv")
    assert not das_rows.duplicated(["k", "layer", "pairing", "condition", "problem_id"]).any()
    for name, data in before.items():  # the same training, rows and angles as uninterrupted
        assert (out / name).read_bytes() == data, name


def test_resuming_a_finished_sweep_prints_no_empty_progress_bar(finished_run, tmp_path, capsys):
    import shutil
    source, args = finished_run
    out = tmp_path / "exp_e"
    shutil.copytree(source / "exp_e", out)
    capsys.readouterr()
    ee.main(ee.parse_args([a if a != str(source / "exp_e") else str(out)
                           for a in _argv(args)] + ["--resume"]))
    assert "layers:" not in capsys.readouterr().err  # every layer was done: no "0/0" bar


def _argv(args):
    """The command line of a parsed namespace as cli() built it."""
    return ["--model", args.model, "--device", "cpu", "--prompts", str(args.prompts),
            "--solved", "off", "--min-pairs", "6", "--layer", "2", "--k", "4", "6",
            "--n-random", "3", "--decode-limit", "2",
            "--decode-random", "1", "--das-k", "2", "4", "--das-steps", "2",
            "--das-eval-every", "1", "--max-new-tokens", "4", "--das-test-min", "0",
            "--out", str(args.out), "--figures", str(args.figures)]


@pytest.mark.parametrize("extra,message", [
    (["--layer", "9"], "pass --layer between 0 and 3"),
    (["--basis-layer", "9"], "pass --layer between 0 and 3"),  # the old spelling, the same flag
    (["--depth", "1.5"], "pass --layer or --depth, not both"),
    (["--k", "64"], "k=64"),
    (["--layers", "0", "7"], "pass --layers between 0 and 3"),
    (["--das-layer", "99"], "pass --das-layer between 0 and 3"),
    (["--decode-layers", "1", "99"], "pass --decode-layers between 0 and 3"),
    (["--das-k", "100"], "pass --das-k between 1 and 63"),
    (["--k", "4", "0"], "pass --k between 1 and 63"),
    (["--last-m", "0"], "--last-m"),
    (["--split", "0.5", "0.5", "0.5"], "--split"),
    (["--limit", "4"], "at least 2 problems"),
    (["--device", "cuda"], "--device"),
    (["--layer", "0"], "--site input at basis layer 0 would patch the embeddings"),
    (["--sweep-limit", "1"], "--sweep-limit 1: pass 2 or more"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        runs.run_cli(ee.main, cli(tmp_path, *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    # "(or --depth F)" only where --depth replaces the flag named
    assert "(or --depth" not in err or extra[0] in ("--layer", "--basis-layer")
    assert "/" not in err.split("pass ")[-1].split()[0]  # one flag named, the one given
    assert not (tmp_path / "exp_e").exists() and not (tmp_path / "fig").exists()


def test_family_wise_tests_follow_how_the_draws_were_made(finished_run, tmp_path, capsys):
    """A new run draws per layer: z_layer's best-layer test is secondary (Holm), z_basis's is
    marked conservative. The same rows read as a run from before the flag (shared draws): z_layer's
    test is exploratory, outside the correction, never significant, and the summary says so."""
    run, args = finished_run
    config = json.loads((run / "exp_e" / "config.json").read_text(encoding="utf-8"))
    assert config["args"]["random_draws"] == "per-layer"
    assert config["random_basis_seeds"] == conditions.PER_LAYER_FORMULA
    best = runs.load_csv(run / "exp_e" / "tests.csv")
    best = best[best.scope.str.startswith("best of")]
    assert set(best[best.condition == "z_layer"].family) == {"secondary"}
    assert best[best.condition == "z_basis"].scope.str.contains("conservative").all()
    old = tmp_path / "exp_e"
    import shutil
    shutil.copytree(run / "exp_e", old)
    del config["args"]["random_draws"]
    (old / "config.json").write_text(json.dumps(config), encoding="utf-8")
    runs.run_cli(ee.main, ee.parse_args(["--replot", "--out", str(old),
                                         "--figures", str(tmp_path / "fig")]))
    tests = runs.load_csv(old / "tests.csv")
    layer = tests[tests.scope.str.startswith("best of") & (tests.condition == "z_layer")]
    assert set(layer.family) == {"exploratory"} and layer.p_holm.isna().all()
    assert not layer.significant.astype(bool).any()
    assert "exploratory: draws shared by the layers are not exchangeable" in capsys.readouterr().out


def test_sweep_limit_sweeps_the_first_pairs_and_das_uses_all(tmp_path):
    args = cli(tmp_path, "--sweep-limit", "4", "--k", "4", "--layers", "1", "--das-layer", "1",
               "--das-k", "2")
    ee.main(args)
    out = tmp_path / "exp_e"
    swept = set(runs.load_csv(out / "per_problem.csv").problem_id)
    assert swept == {"p0", "p1", "p2", "p3"}
    das_rows = runs.load_csv(out / "das_per_problem.csv")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert set(das_rows.problem_id) == set(config["splits"]["test"])
    assert len(config["splits"]["train"] + config["splits"]["test"]
               + config["splits"]["validation"]) == 8
    assert "the sweeps ran on the first 4 of them (--sweep-limit)" in "\n".join(
        summary.summary_lines(out))


def test_resume_of_a_run_from_before_random_draws_keeps_shared_draws(tmp_path):
    out = tmp_path / "exp_e"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"script": "exp_e_layer_sweep.py",
                                                 "args": {"seed": 0}}), encoding="utf-8")
    args = SimpleNamespace(random_draws=None, out=str(out), resume=True)
    assert conditions.resolve_draws(args) == "shared"
    assert conditions.resolve_draws(SimpleNamespace(random_draws=None, out=str(out),
                                                    resume=False)) == "per-layer"


@pytest.mark.parametrize("site,primary", [("input", 1), ("output", 2)])
def test_the_primary_tests_layer_is_always_swept(tmp_path, site, primary):
    """Z of basis layer 2 is tested at sweep layer 1 (the output of 1 = the input of 2) with
    --site input, at layer 2 with --site output; a --layers list without it gains it."""
    args = cli(tmp_path, "--layers", "0", "3", "--site", site)
    ee.validate(args)
    assert ee.primary_layer_of(args) == primary and args.layers == sorted([0, 3, primary])


@pytest.mark.parametrize("depth,message", [("1.5", "--depth 1.5 is not a fraction"),
                                           ("0", "--depth 0.0 is not a fraction")])
def test_depth_alone_resolves_like_the_other_scripts(tmp_path, capsys, depth, message):
    """--depth without --layer: layer_choice.resolve_layer, the same rule and messages as B-D."""
    with pytest.raises(SystemExit) as exit_info:
        runs.run_cli(ee.main, cli(tmp_path, "--depth", depth, layer=()))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    args = cli(tmp_path, layer=())
    ee.validate(args)
    assert args.layer == 3  # no flag: the plan's layer 32 of 36 at this depth, 3 of 4


def test_every_flag_has_a_help_text():
    for action in ee.build_parser()._actions:
        assert action.help, action.option_strings


def test_readme_smoke_command_runs_end_to_end(tmp_path, monkeypatch):
    """`python exp_e_layer_sweep.py --model tiny-random --smoke`, exactly as the README shows."""
    monkeypatch.chdir(tmp_path)  # the default --out and --figures are relative
    args = ee.parse_args(smoke_argv("E"))
    assert (args.limit, args.k, args.das_k, args.depth) == (6, [8], [4], [0.5])
    ee.main(args)
    out = tmp_path / "results" / "exp_e"
    for name in ["per_layer.csv", "draws.csv", "decode.csv", "das.csv", "config.json"]:
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["basis_layer"] == 2  # 0.5 x 4 layers
    assert (tmp_path / "figures" / "exp_e" / "layer_sweep.png").is_file()


def test_smoke_preset_leaves_given_flags_alone():
    args = ee.parse_args(["--model", "tiny-random", "--smoke", "--basis-layer", "1", "--k", "6"])
    assert (args.layer, args.depth, args.k, args.limit) == ([1], None, [6], 6)
