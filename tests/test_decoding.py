"""Decoding and scoring: the fast engine against the eager loop and the Hugging Face model, batching,
sorting rows into batches, finishing rows (stop tokens, the end of a number), the shared prefill.
Everything in float32 on the CPU (conftest's tiny model), where the engines agree token for token."""
import argparse
import dataclasses

import pytest
import torch

import common
from zcausal import decoding, problems, runs
from helpers import MIXED, TEXTS, conditions, has_hooks, make_patch

ENGINES = ["eager", "fast"]


def _ids(tok, texts):
    ids, mask, _ = common.tokenize_left_padded(tok, texts)
    return ids, mask


def _conts(tok, n):
    return [problems.answer_continuation(tok, a, "en") for a in (12, 8, 1234, 5, 77, 3)[:n]]


def _assert_same(a, b, atol=1e-5):
    """Same tokens, lengths and scores (to atol); same logits where both were recorded."""
    assert torch.equal(a["tokens"], b["tokens"])
    assert torch.equal(a["lengths"], b["lengths"])
    for x, y in zip(a["scores"], b["scores"]):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)
    if "logits" in a and "logits" in b:  # raw logits (up to ~50 here) get a relative tolerance:
        # another CPU's BLAS blocks float32 products differently (seen: 1.6e-5 on a logit of 0.5)
        torch.testing.assert_close(a["logits"], b["logits"], atol=atol, rtol=10 * atol)


def _case(model, name):
    """The patch of a named case for the five MIXED prompts (source tokens aligned to their width)."""
    d, n = common.hidden_size(model), len(MIXED)
    z = common.z_basis(model, 2, 4).expand(n, -1, -1)
    source = torch.randn(n, d, generator=torch.Generator().manual_seed(1)) * 3
    if name == "none":
        return None
    if name == "noop":  # zero basis, not complemented: P_S = 0
        return make_patch(2, torch.zeros(n, 4, d), [False] * n, source, [True] * n)
    if name in ("z_prompt", "z_all"):
        return make_patch(2, z, [False] * n, source, [name == "z_all"] * n)
    if name == "zperp_all":
        return make_patch(2, z, [True] * n, source, [True] * n)
    if name == "full_all":
        return make_patch(2, torch.zeros(n, 1, d), [True] * n, source, [True] * n)
    if name == "mixed":
        return conditions(model, n)
    if name == "site_input":  # the input of layer 2 = stream 1
        return make_patch(2, z, [False] * n, source, [True] * n, site="input")
    if name == "embeddings":  # the input of layer 0 = the embeddings, stream -1
        return make_patch(0, common.z_basis(model, 0, 4).expand(n, -1, -1), [True] * n, source,
                          [True] * n, site="input")
    raise ValueError(name)


CASES = ["none", "noop", "z_prompt", "z_all", "zperp_all", "full_all", "mixed", "site_input",
         "embeddings"]


@pytest.mark.parametrize("case", CASES)
def test_fast_engine_matches_eager_tokens_scores_logits(tiny, case):
    model, tok = tiny
    ids, mask = _ids(tok, MIXED)
    assert len(set(mask.sum(1).tolist())) == len(MIXED)  # every row a different prompt length
    patch = _case(model, case)
    out = {engine: decoding.generate_and_score(model, ids, mask, 8, patch, score=[_conts(tok, 5)],
                                               return_logits=True, engine=engine)
           for engine in ENGINES}
    _assert_same(out["eager"], out["fast"])
    assert out["fast"]["steps"] == 7 and not has_hooks(model)


def test_fast_engine_with_prompt_mask_and_per_token_source(tiny):
    """prompt_mask and source_tokens (OT, `last:m`) only touch the prompt pass, which both engines
    share; the generated positions use the mean source."""
    model, tok = tiny
    ids, mask = _ids(tok, MIXED)
    n, T, d = ids.shape[0], ids.shape[1], common.hidden_size(model)
    gen = torch.Generator().manual_seed(2)
    patch = dataclasses.replace(_case(model, "z_all"), source_tokens=torch.randn(n, T, d, generator=gen),
                                prompt_mask=mask.bool() & (torch.arange(T) >= T - 3))
    out = [decoding.generate_and_score(model, ids, mask, 6, patch, return_logits=True, engine=e)
           for e in ENGINES]
    _assert_same(*out)
    unmasked = decoding.generate_and_score(model, ids, mask, 6, dataclasses.replace(
        patch, prompt_mask=None), return_logits=True, engine="fast")
    assert not torch.allclose(unmasked["logits"][:, 0], out[1]["logits"][:, 0])  # the mask matters


@pytest.mark.parametrize("engine", ENGINES)
def test_unpatched_decode_equals_hugging_face_generate(tiny, engine):
    model, tok = tiny
    ids, mask = _ids(tok, MIXED)
    ours = decoding.generate_and_score(model, ids, mask, 10, engine=engine, return_logits=True)
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10,
                            min_new_tokens=10, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(ours["tokens"], theirs.sequences[:, ids.shape[1]:])
    torch.testing.assert_close(ours["logits"], torch.stack(theirs.logits, 1).float(), atol=1e-4,
                               rtol=1e-4)


def test_fast_step_logits_equal_a_full_forward_over_the_generated_text(tiny):
    """Each step's logits are the Hugging Face forward's over prompt + tokens so far (one pass,
    no cache): the written-out attention, RoPE positions and GQA are Qwen2's."""
    model, tok = tiny
    ids, mask = _ids(tok, MIXED)
    out = decoding.generate_and_score(model, ids, mask, 6, engine="fast", return_logits=True)
    full_ids = torch.cat([ids, out["tokens"]], 1)
    full_mask = torch.cat([mask, torch.ones_like(out["tokens"])], 1)
    with torch.no_grad():
        logits = model(input_ids=full_ids, attention_mask=full_mask,
                       position_ids=common.position_ids_from_mask(full_mask)).logits
    torch.testing.assert_close(out["logits"], logits[:, ids.shape[1] - 1:-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("engine", ENGINES)
def test_batched_generation_equals_one_at_a_time(tiny, engine):
    model, tok = tiny
    ids, mask = _ids(tok, MIXED)
    patch = conditions(model, len(MIXED))
    batched = decoding.generate_and_score(model, ids, mask, 8, patch, return_logits=True,
                                          engine=engine)
    for row, text in enumerate(MIXED):
        one_ids, one_mask = _ids(tok, [text])
        one_patch = common.SubspacePatch(
            layer=patch.layer, basis=patch.basis[row:row + 1], complement=patch.complement[row:row + 1],
            source_mean=patch.source_mean[row:row + 1],
            patch_generated=patch.patch_generated[row:row + 1])
        single = decoding.generate_and_score(model, one_ids, one_mask, 8, one_patch,
                                             return_logits=True, engine=engine)
        assert torch.equal(single["tokens"][0], batched["tokens"][row])
        torch.testing.assert_close(single["logits"][0], batched["logits"][row], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("engine", ENGINES)
def test_sorting_rows_into_batches_changes_no_row(tiny, engine):
    model, tok = tiny
    texts = MIXED + [MIXED[1], MIXED[4], MIXED[0]]  # repeats and lengths out of order
    ids, mask = _ids(tok, texts)
    patch = conditions(model, 5)
    patch = dataclasses.replace(patch, **{f: torch.cat([getattr(patch, f), getattr(patch, f)[[2, 0, 4]]])
                                          for f in ("basis", "complement", "source_mean",
                                                    "patch_generated")})
    conts = _conts(tok, 6) + _conts(tok, 2)
    whole = decoding.generate_and_score(model, ids, mask, 6, patch, score=[conts],
                                        return_logits=True, engine=engine)
    for batch_size in (1, 3):
        sorted_ = decoding.generate_and_score(model, ids, mask, 6, patch, score=[conts],
                                              return_logits=True, engine=engine,
                                              batch_size=batch_size)
        _assert_same(whole, sorted_, atol=1e-4)
    length = mask.sum(1).tolist()
    order = [r for batch in decoding._batches(mask, 3) for r in batch]
    assert [length[r] for r in order] == sorted(length)  # batches do go by prompt length


def _first_tokens(model, ids, mask, n):
    return decoding.generate_and_score(model, ids, mask, n, engine="eager")["tokens"]


@pytest.mark.parametrize("engine", ENGINES)
def test_batch_whose_rows_all_stop_early_ends_early(tiny, engine):
    model, tok = tiny
    ids, mask = _ids(tok, MIXED)
    free = _first_tokens(model, ids, mask, 12)
    stop = sorted(set(free[:, 1].tolist()))  # every row's second token stops it
    assert not set(free[:, 0].tolist()) & set(stop)
    out = decoding.generate_and_score(model, ids, mask, 12, stop_ids=stop, engine=engine,
                                      return_logits=True)
    assert out["steps"] <= 1 + decoding.CHECK_EVERY < 11  # far fewer than the 11 steps allowed
    assert (out["lengths"] == 2).all()
    assert torch.equal(out["tokens"][:, :2], free[:, :2])
    assert (out["tokens"][:, 2:] == min(stop)).all()  # filled after the end
    assert (out["logits"][:, 2:] == 0).all() and (out["logits"][:, :2] != 0).any()
    texts = [problems.decode_response(tok, row, stop) for row in out["tokens"]]
    assert texts == [tok.decode(row[:1]) for row in free]


def test_rows_that_stop_at_different_steps_match_across_engines(tiny):
    model, tok = tiny
    ids, mask = _ids(tok, MIXED)
    free = _first_tokens(model, ids, mask, 10)
    stop = [int(free[0, 2]), int(free[3, 6])]  # two rows stop, the others run to the end
    out = [decoding.generate_and_score(model, ids, mask, 10, conditions(model, 5), stop_ids=stop,
                                       return_logits=True, engine=e) for e in ENGINES]
    _assert_same(*out)
    assert out[0]["lengths"].tolist() != [10] * 5


@pytest.mark.parametrize("engine", ENGINES)
def test_stop_when_number_ends(tiny, engine):
    """A row finishes at its first token without a digit after a token with one: here "digit"
    tokens are planted as each row's first two tokens."""
    model, tok = tiny
    ids, mask = _ids(tok, MIXED)
    free = _first_tokens(model, ids, mask, 12)
    digits = torch.zeros(model.lm_head.out_features, dtype=torch.bool)
    digits[free[:, :2].flatten()] = True
    digits[free[:, 2]] = False
    out = decoding.generate_and_score(model, ids, mask, 12, engine=engine,
                                      stop_when_number_ends=True, digits=digits)
    assert (out["lengths"] == 3).all() and out["steps"] < 11
    assert torch.equal(out["tokens"][:, :3], free[:, :3])
    never = decoding.generate_and_score(model, ids, mask, 12, engine=engine)
    assert torch.equal(never["tokens"], free) and (never["lengths"] == 12).all()


def test_digit_token_mask_marks_the_tokens_with_a_digit(tiny):
    model, tok = tiny
    table = decoding.digit_token_mask(tok, model.lm_head.out_features)
    assert table.shape == (model.lm_head.out_features,) and table.dtype == torch.bool
    for text in ("0", "7", " 42", "123"):
        assert all(table[i] for i in tok(text, add_special_tokens=False)["input_ids"]
                   if any(c.isdigit() for c in tok.decode([i])))
    for text in (" apples", "。", " The"):
        assert not any(table[i] for i in tok(text, add_special_tokens=False)["input_ids"])
    assert 0 < int(table.sum()) < len(tok) // 2
    ids, mask = _ids(tok, MIXED * 2)  # a tokenizer or the model's own: the same rows
    a = decoding.generate_and_score(model, ids, mask, 8, stop_when_number_ends=True, digits=tok)
    c = decoding.generate_and_score(model, ids, mask, 8, stop_when_number_ends=True)
    assert torch.equal(a["tokens"], c["tokens"])
    vocab = model.lm_head.out_features  # digits=None finds the model's own tokenizer's tables
    assert torch.equal(decoding._end_tables(model, True, None, vocab)["digit"], table)
    free = _first_tokens(model, ids, mask, 8)
    for row, length in zip(free.tolist(), a["lengths"].tolist()):  # problems' rule, the same ends
        end, _ = problems.answer_end(tok, row)
        assert length == (end or 8)
    model.name_or_path_for_results = "no-such-model-folder"  # no tokenizer to be found
    with pytest.warns(UserWarning, match="digits=tokenizer"):
        d = decoding.generate_and_score(model, ids, mask, 8, stop_when_number_ends=True)
    assert torch.equal(d["tokens"], free) and (d["lengths"] == 8).all()


def _planted_traits(vocab, seed):
    """Random answer-end traits for every token id (problems.TRAITS): digits, blanks, lead bytes
    that leave a character unfinished and continuation-only tokens, often enough that rows end at
    every kind of step."""
    gen = torch.Generator().manual_seed(seed)
    draw = torch.rand(vocab, generator=gen)
    only = (draw > 0.55) & (draw <= 0.75)
    return {"digit": draw <= 0.35, "blank": (draw > 0.35) & (draw <= 0.45), "only_continuation": only,
            "leading_continuation": torch.where(only, torch.randint(1, 3, (vocab,), generator=gen), 0),
            "deficit": torch.where((draw > 0.45) & (draw <= 0.55),
                                   torch.randint(1, 3, (vocab,), generator=gen), 0)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_answer_end_rule_is_the_same_in_both_engines_and_in_problems(tiny, seed):
    """The unit-word stop: after the number, the first token that is not blank and leaves no
    character unfinished ends the row. On planted traits, both engines end every row where
    problems.end_of_answer says, with the same tokens, and a batch ends once all rows have."""
    model, tok = tiny
    ids, mask = _ids(tok, MIXED)
    traits = _planted_traits(model.lm_head.out_features, seed)
    out = [decoding.generate_and_score(model, ids, mask, 12, conditions(model, 5), engine=e,
                                       stop_when_number_ends=True, digits=traits,
                                       return_logits=True) for e in ENGINES]
    _assert_same(*out)
    free = decoding.generate_and_score(model, ids, mask, 12, conditions(model, 5),
                                       engine="eager")["tokens"]
    lengths = out[0]["lengths"].tolist()
    for row, length, kept in zip(free.tolist(), lengths, out[0]["tokens"].tolist()):
        end, _ = problems.end_of_answer(
            [tuple(int(traits[name][t]) for name in problems.TRAITS) for t in row])
        assert length == (end or 12) and kept[:length] == row[:length]
    assert min(lengths) < 12


def test_answer_end_reads_the_unit_word_of_each_language(tiny):
    """A direct answer ends at the unit word's first letter or character, a split character
    completed first; the language is that of the whole output."""
    _, tok = tiny
    stop = problems.stop_token_ids(tok)
    for text, output, language in (("386 minutes.\n\nQuestion", "386 m", "en"),
                                   ("81 颗纽扣。", "81 颗", "zh"), ("156 元", "156 元", "zh"),
                                   ("60.\n\n", "60.", "none"), ("60 \n", "60 \n", "none")):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        read = problems.read_output(tok, ids + [tok.eos_token_id] * 3, stop, "direct", 20)
        assert (read["output"], read["language"], read["answer"]) == (
            output, language, problems.first_number(text)), text


@pytest.mark.parametrize("engine", ENGINES)
def test_shared_prefill_gives_the_same_decodes_as_a_full_prompt_pass(tiny, engine):
    model, tok = tiny
    ids, mask = _ids(tok, MIXED)
    prefill = decoding.shared_prefill(model, ids, mask, 2)
    rows = [3, 0, 0, 2, 1]  # repeats: several conditions of one prompt share its prefill
    selected = decoding.select_prefill(prefill, rows)
    patch = conditions(model, len(rows))
    conts = _conts(tok, 5)
    fast = decoding.generate_and_score(model, selected["input_ids"], selected["attention_mask"], 8,
                                       patch, score=[conts], return_logits=True, prefill=selected,
                                       engine=engine)
    full_ids, full_mask = _ids(tok, [MIXED[r] for r in rows])
    slow = decoding.generate_and_score(model, full_ids, full_mask, 8, patch, score=[conts],
                                       return_logits=True, engine="eager")
    _assert_same(fast, slow, atol=1e-4)
    sorted_ = decoding.generate_and_score(model, selected["input_ids"], selected["attention_mask"],
                                          8, patch, score=[conts], return_logits=True,
                                          prefill=selected, engine=engine, batch_size=2)
    _assert_same(fast, sorted_, atol=1e-4)
    assert not has_hooks(model)


def test_scopes_differ_only_from_first_generated_token(tiny):
    model, tok = tiny
    ids, mask = _ids(tok, TEXTS)
    d = common.hidden_size(model)
    source = torch.randn(3, d) * 3
    out = {}
    for scope in ("prompt", "all"):
        patch = make_patch(2, torch.zeros(3, 1, d), [True] * 3, source, [scope == "all"] * 3)  # full
        out[scope] = decoding.generate_and_score(model, ids, mask, 6, patch, return_logits=True)
    first = out["prompt"]["logits"][:, 0], out["all"]["logits"][:, 0]
    assert torch.equal(*first)  # the prompt forward is identical
    assert torch.equal(out["prompt"]["tokens"][:, 0], out["all"]["tokens"][:, 0])
    assert not torch.allclose(out["prompt"]["logits"][:, 1:], out["all"]["logits"][:, 1:], atol=1e-3)


def test_scores_first_tokens_top1_and_language_margin_match_a_full_forward(tiny):
    """Summed log p of each continuation, log p of its first token, the argmax at the last prompt
    position, and the language margin after it (the lone-space probe fed, not scored), all from
    one forward over prompt + continuation + space with the patch as the decoding loop applies it."""
    model, tok = tiny
    ids, mask = _ids(tok, TEXTS)
    conts = _conts(tok, 3)
    patch = conditions(model, 3)
    languages = common.LanguageClasses(tok)
    got = decoding.generate_and_score(model, ids, mask, 0, patch, score=[conts],
                                      languages=languages)
    plain = decoding.continuation_logprob(model, ids, mask, conts, patch)
    torch.testing.assert_close(got["scores"][0], plain, atol=1e-5, rtol=0)
    for row, text in enumerate(TEXTS):
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        full = torch.tensor([prompt + conts[row] + [languages.space_id]])
        one = common.SubspacePatch(layer=2, basis=patch.basis[row:row + 1],
                                   complement=patch.complement[row:row + 1],
                                   source_mean=patch.source_mean[row:row + 1],
                                   patch_generated=patch.patch_generated[row:row + 1])
        # Manual reference: the prompt positions get the prompt patch, the answer positions get the
        # generated-position patch (or none), exactly as the decoding loop defines them.
        n, c = len(prompt), len(conts[row])

        def fn(hidden, one=one, n=n):
            one.phase = "prompt"
            head = one(hidden[:, :n])
            one.phase = "generate"
            tail = one(hidden[:, n:])
            return torch.cat([head, hidden[:, n:] if tail is None else tail], 1)

        with common.layer_output_hook(model, 2, fn), torch.no_grad():
            logp = torch.log_softmax(model(full).logits[0].float(), -1)
        want = sum(float(logp[n - 1 + j, t]) for j, t in enumerate(conts[row]))
        assert abs(float(plain[row]) - want) < 1e-3
        assert abs(float(got["first_scores"][0][row]) - float(logp[n - 1, conts[row][0]])) < 1e-3
        assert int(got["top1"][row]) == int(logp[n - 1].argmax())
        margin = common.language_margin(logp[None, n - 1 + c], logp[None, n + c], languages)
        assert abs(float(got["margins"][0][row]) - float(margin[0])) < 1e-3


def test_fast_engine_sees_weights_edited_in_place(tiny):
    model, tok = tiny
    ids, mask = _ids(tok, TEXTS)
    before = decoding.generate_and_score(model, ids, mask, 6, engine="fast", return_logits=True)
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.bias.add_(0.5)
        model.model.layers[2].self_attn.q_proj.weight.mul_(1.5)
    out = [decoding.generate_and_score(model, ids, mask, 6, engine=e, return_logits=True)
           for e in ENGINES]
    _assert_same(*out)
    assert not torch.allclose(before["logits"][:, 1:], out[1]["logits"][:, 1:])


def test_engine_flag_and_resolution(tiny):
    model, _ = tiny
    parser = decoding.add_decode_args(argparse.ArgumentParser())
    assert parser.parse_args([]).decode == "auto"
    assert parser.parse_args(["--decode", "eager"]).decode == "eager"
    with pytest.raises(SystemExit):
        parser.parse_args(["--decode", "turbo"])
    assert decoding.resolve_engine("auto", model) == decoding.CPU_ENGINE
    assert decoding.resolve_engine("eager", model) == "eager"
    with pytest.raises(runs.UsageError, match="unknown decode engine"):
        decoding.resolve_engine("turbo", model)
    model.config.use_sliding_window = True
    with pytest.raises(runs.UsageError, match="--decode eager"):
        decoding.resolve_engine("fast", model)
    assert decoding.resolve_engine("auto", model) == "eager"


@pytest.mark.parametrize("new_tokens", [0, 1, 2])
def test_engines_agree_at_zero_one_and_two_new_tokens(tiny, new_tokens):
    model, tok = tiny
    ids, mask = _ids(tok, TEXTS)
    out = [decoding.generate_and_score(model, ids, mask, new_tokens, conditions(model, 3),
                                       score=[_conts(tok, 3)], return_logits=True, engine=e)
           for e in ENGINES]
    _assert_same(*out)
    assert out[1]["tokens"].shape == (3, new_tokens) and out[1]["steps"] == max(0, new_tokens - 1)
    assert (out[1]["lengths"] == new_tokens).all()
