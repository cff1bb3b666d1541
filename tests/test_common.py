"""Invariants of the shared machinery: the Z basis, projections, hooks, patching, parsing.
(Decoding, scoring and the shared prefill: test_decoding.py.)"""
import json

import pytest
import torch

import common
from zcausal import problems, runs
from helpers import TEXTS, has_hooks, make_patch


def per_head_z_basis(model, layer, k):
    """Direct, loop-per-head computation of Phase 2's Z, written independently of common."""
    config = model.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    d_head = config.hidden_size // n_heads
    attn = model.model.layers[layer].self_attn
    tops = []
    for h in range(n_heads):
        g = h // (n_heads // n_kv)
        w_q = attn.q_proj.weight[h * d_head:(h + 1) * d_head].double()
        w_k = attn.k_proj.weight[g * d_head:(g + 1) * d_head].double()
        tops.append(torch.linalg.svd(w_q.T @ w_k).Vh[:k])
    return torch.linalg.svd(torch.cat(tops), full_matrices=False).Vh[:k]


@pytest.mark.parametrize("k", [1, 5, 16, 20])  # 20 > d_head: the full-SVD fallback
def test_projector_is_symmetric_idempotent_rank_k(tiny, k):
    model, _ = tiny
    basis = common.z_basis(model, 2, k)
    assert basis.shape == (k, common.hidden_size(model)) and basis.dtype == torch.float32
    p = (basis.T @ basis).double()
    assert torch.allclose(p, p.T, atol=1e-6)
    assert torch.allclose(p @ p, p, atol=1e-5)
    assert torch.linalg.matrix_rank(p, atol=1e-4) == k
    assert torch.allclose(basis @ basis.T, torch.eye(k), atol=1e-5)


def test_z_basis_matches_direct_per_head_computation(tiny):
    model, _ = tiny
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA is exercised
    for layer, k in [(0, 3), (3, 8)]:
        ours = common.z_basis(model, layer, k).double()
        direct = per_head_z_basis(model, layer, k)
        # Same subspace (singular vectors are defined up to sign): compare the projectors.
        assert torch.allclose(ours.T @ ours, direct.T @ direct, atol=1e-5)


def test_random_basis_orthonormal_and_seeded():
    a, b, c = common.random_basis(64, 7, 3), common.random_basis(64, 7, 3), common.random_basis(64, 7, 4)
    assert torch.allclose(a @ a.T, torch.eye(7), atol=1e-5)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_low_rank_projection_equals_dense_projector():
    basis = common.random_basis(64, 9, 0)
    x = torch.randn(3, 5, 64)
    assert torch.allclose(common.project(x, basis), x @ (basis.T @ basis), atol=1e-5)


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask,
                     position_ids=common.position_ids_from_mask(mask)).logits


def test_self_source_patch_leaves_logits_unchanged(tiny):
    model, tok = tiny
    ids, mask, _ = common.tokenize_left_padded(tok, TEXTS)
    baseline = _logits(model, ids, mask)
    own = common.capture_layer_outputs(model, ids, mask, [1])[1]
    z = common.z_basis(model, 1, 6)
    d = common.hidden_size(model)
    for basis, complement in [(z, False), (z, True), (torch.zeros(6, d), True)]:  # Z, Z-perp, full
        patch = make_patch(1, basis.expand(3, -1, -1), [complement] * 3, torch.randn(3, d),
                       [False] * 3, source_tokens=own)
        with common.layer_output_hook(model, 1, patch):
            assert torch.equal(_logits(model, ids, mask), baseline)


def test_none_patch_is_bit_exact_and_other_patches_change_logits(tiny):
    model, tok = tiny
    ids, mask, _ = common.tokenize_left_padded(tok, TEXTS)
    baseline = _logits(model, ids, mask)
    d = common.hidden_size(model)
    none = make_patch(2, torch.zeros(3, 4, d), [False] * 3, torch.randn(3, d) * 5, [True] * 3)
    with common.layer_output_hook(model, 2, none):
        assert torch.equal(_logits(model, ids, mask), baseline)
    z = make_patch(2, common.z_basis(model, 2, 4).expand(3, -1, -1), [False] * 3,
               torch.randn(3, d) * 5, [True] * 3)
    with common.layer_output_hook(model, 2, z):
        assert not torch.allclose(_logits(model, ids, mask), baseline, atol=1e-3)


def test_hooks_removed_after_context_and_after_exception(tiny):
    model, tok = tiny
    ids, mask, _ = common.tokenize_left_padded(tok, TEXTS)
    baseline = _logits(model, ids, mask)
    with common.layer_output_hook(model, 1, lambda h: h * 0):
        assert has_hooks(model)
        assert not torch.allclose(_logits(model, ids, mask), baseline)
    assert not has_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with common.layer_output_hook(model, 1, lambda h: h * 0):
            raise RuntimeError("boom")
    assert not has_hooks(model)
    assert torch.equal(_logits(model, ids, mask), baseline)
    common.capture_layer_outputs(model, ids, mask, [-1, 0, 2])  # stops the pass by an exception
    assert not has_hooks(model)


def test_hook_handles_tuple_outputs(tiny):
    """transformers 4.x decoder layers return tuples; the hook must patch element 0 only."""
    model, tok = tiny
    ids, mask, _ = common.tokenize_left_padded(tok, TEXTS[:1])
    layer = model.model.layers[1]
    seen = {}
    handle = layer.register_forward_hook(lambda m, i, o: (o, "extra"))  # make it a tuple
    try:
        # our hook is registered after, so it sees the tuple
        with common.layer_output_hook(model, 1, lambda h: seen.setdefault("h", h) * 1.0):
            out = layer(model.model.embed_tokens(ids), position_embeddings=model.model.rotary_emb(
                model.model.embed_tokens(ids), common.position_ids_from_mask(mask)))
    finally:
        handle.remove()
    assert isinstance(out, tuple) and out[1] == "extra" and torch.equal(out[0], seen["h"])


def test_mean_pool_excludes_padding(tiny):
    model, tok = tiny
    ids, mask, _ = common.tokenize_left_padded(tok, TEXTS)
    hidden = common.capture_layer_outputs(model, ids, mask, [1])[1]
    pooled = common.mean_pool(hidden, mask.bool())
    for row, text in enumerate(TEXTS):
        one_ids, one_mask, _ = common.tokenize_left_padded(tok, [text])
        alone = common.capture_layer_outputs(model, one_ids, one_mask, [1])[1][0].mean(0)
        torch.testing.assert_close(pooled[row], alone, atol=1e-4, rtol=1e-4)


def test_question_span_mask():
    tok = common.tiny_tokenizer()
    text, span = problems.format_prompt("Q: {question}\nA:", "Tom has 3 apples.")
    assert text[span[0]:span[1]] == "Tom has 3 apples."
    ids, mask, span_mask = common.tokenize_left_padded(tok, [text, "x"], [span, (0, 1)])
    covered = tok.decode(ids[0][span_mask[0]])
    assert "Tom has 3 apples" in covered and "A:" not in covered


@pytest.mark.parametrize("text, answer", [
    (" 5050.", 5050), ("so \\boxed{84} is it", 84), (" It costs 1,250 dollars.", 1250),
    (" -3", -3), (" 3/4", 0.75), (" 2.5 hours", 2.5),
    (" 3 + 4 = 7. The answer is 7.\n\nQuestion: 5 + 5?\nAnswer: 10", 7),
    (" 12 * 3 = 36。答案是36。", 36), ("0000000000", 0), (" no number here", None),
    (" 6 * 7 + 9 * 3 = 42 + 27 = 69. The answer is 69.", 69),
])
def test_extract_answer(text, answer):
    got = problems.extract_answer(text)
    assert (got is None and answer is None) or abs(got - answer) < 1e-9


@pytest.mark.parametrize("text, language", [
    # the three answers the issue names: the words before the number count as much as after it
    ("书包的总费用是 156", "zh"), ("行驶 154 kilometers", "mixed"), ("米莉 gets 81 buttons", "mixed"),
    # Chinese
    ("5个盒子装60个鸡蛋。答案是60。", "zh"), ("81 颗", "zh"), ("罐子里的花朵总数是 30。\n\n", "zh"),
    ("球。\n\nQuestion: A car costs $12", "zh"),  # read up to the next example only
    ("学生总数 = 5 * 30 = 150 students", "zh"),  # 4 ideographs, 1 word: share 0.8
    # English
    (" 6 * 7 = 42. The answer is 42.", "en"), ("386 m", "en"), ("44 meters", "en"),
    ("The total is 156 dollars, 元", "en"),  # 1 ideograph, 5 words: share 0.17
    # mixed
    ("I have 3 个苹果 and 2 个橙子 in the 篮子里面", "mixed"), ("钱是 140 dollars", "mixed"),
    ("苹果s left, so 12 are left over", "mixed"),
    # no letters
    (" 5050.", "none"), ("42.", "none"), ("", "none"), ("111", "none"),  # too short to repeat
    # degenerate: counted apart, never a language
    ("0000000000", "degenerate"), ("苹果苹果苹果苹果", "degenerate"),
    ("the the the the the", "degenerate"), ("米米米米米米米米米米", "degenerate"),
])
def test_classify_language_reads_the_whole_answer(text, language):
    assert problems.classify_language(text) == language


@pytest.mark.parametrize("baseline, patched, changed", [
    ("en", "zh", True), ("en", "mixed", True), ("zh", "en", True), ("en", "en", False),
    ("en", "degenerate", False), ("en", "none", False), ("none", "zh", False),
    ("degenerate", "en", False),
])
def test_a_degenerate_or_wordless_output_is_never_a_language_change(baseline, patched, changed):
    assert problems.changed_language(baseline, patched) is changed


def test_decode_response_cuts_at_stop_token(tiny):
    _, tok = tiny
    ids = tok(" 42. The answer is 42.", add_special_tokens=False)["input_ids"]
    stop = problems.stop_token_ids(tok)
    assert problems.decode_response(tok, ids + [tok.eos_token_id] + ids, stop) == " 42. The answer is 42."


def _write(tmp_path, obj):
    path = tmp_path / "p.json"
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


GOOD = {"templates": {"direct": {"en": "Q: {question}\nA:", "zh": "问：{question}\n答："}},
        "pairs": [{"id": "a", "category": "c", "en": "x", "zh": "y", "answer": 1}]}


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(pairs=[]), "no pairs"),
    (lambda d: d["pairs"][0].pop("zh"), 'no "zh"'),
    (lambda d: d["pairs"][0].update(answer="1"), "wrong type"),
    (lambda d: d["pairs"].append(dict(d["pairs"][0])), "duplicate id"),
    (lambda d: d.pop("templates"), "templates"),
    (lambda d: d["templates"]["direct"].update(en="no placeholder"), "templates"),
    (lambda d: d.update(templates={"en": "Q: {question}", "zh": "问：{question}"}), "templates"),
    (lambda d: d["pairs"][0].update(zh="  "), "'a' has an empty \"zh\" question"),
])
def test_load_prompts_rejects_bad_files(tmp_path, mutate, message):
    data = json.loads(json.dumps(GOOD))
    mutate(data)
    with pytest.raises(runs.UsageError, match=message):
        problems.load_prompts(_write(tmp_path, data))


def test_load_prompts_missing_and_malformed(tmp_path):
    with pytest.raises(runs.UsageError, match="does not exist"):
        problems.load_prompts(tmp_path / "nope.json")
    with pytest.raises(runs.UsageError, match="not valid JSON"):
        problems.load_prompts(_write(tmp_path, "{"))
    assert problems.load_prompts(_write(tmp_path, GOOD))["pairs"][0]["id"] == "a"


def test_bad_layer_k_and_missing_model(tiny, tmp_path):
    model, _ = tiny
    with pytest.raises(runs.UsageError, match="layers 0..3"):
        common.check_layer(model, 4)
    with pytest.raises(runs.UsageError, match="--k between 1 and 64"):
        common.check_k(model, 0)
    with pytest.raises(runs.UsageError, match="--k between 1 and 64"):
        common.check_k(model, 65)
    with pytest.raises(runs.UsageError, match="--model PATH"):
        common.load_model_config(str(tmp_path / "no-such-model"))


def test_repo_prompts_are_valid_and_answers_computed_independently():
    data = problems.load_prompts(problems.DEFAULT_PROMPTS)
    pairs = data["pairs"]
    assert len(pairs) >= 40 and len({p["category"] for p in pairs}) >= 10
    for p in pairs:
        assert eval(p["expr"], {"__builtins__": {}}) == p["answer"], p["id"]  # noqa: S307
        assert problems._CJK.search(p["zh"]) and not problems._CJK.search(p["en"])
    for lang in ("en", "zh"):  # each template's worked examples parse to their stated answers
        for name in ("direct", "cot"):
            demo = data["templates"][name][lang].split("{question}")[0]
            assert problems.extract_answer(demo.split("\n")[1]) in (60, 27), (name, lang)


def test_cache_key_changes_with_the_weights(tiny):
    model, _ = tiny
    before = common.model_fingerprint(model)
    assert common.model_fingerprint(model) == before
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight[0, 0] += 1.0
    assert common.model_fingerprint(model) != before
