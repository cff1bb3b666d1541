"""A model split across devices (--device-map): the tiny model's layers spread over CPU memory and
disk offload (accelerate keeps offloaded weights on the meta device between forwards, so nothing may
read a weight or a device off the model's first parameter) gives the same rows as the whole model,
exactly (float32 on a CPU): A's patch readouts, decode and scores, E's interchange rows at the last
positions and at the question's, DAS's loss and gradient, B's activations, the Z basis. The fast
decode engine falls back to the eager loop with a one-line note; config.json records the map; a bad
map is one line and exit 2."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import common
import exp_e_layer_sweep as ee
from zcausal import bank, das, decoding, patching, problems, question, runs
from helpers import MIXED, conditions

# The embedding (and the tied lm_head) on disk: the model's first parameter is then on the meta
# device, and the input device is where accelerate runs the embedding.
SPLIT = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
         "model.layers.1": "disk", "model.layers.2": "cpu", "model.layers.3": "disk",
         "model.norm": "cpu", "lm_head": "disk"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The seed-0 tiny model whole, and the same weights split by SPLIT."""
    whole = common.load_model(common.TINY_MODEL, device="cpu")
    split = common.load_model(common.TINY_MODEL, device_map=SPLIT,
                              offload_folder=tmp_path_factory.mktemp("offload"))
    return whole, split


def test_the_split_model_is_split_and_config_json_says_where_each_module_went(models):
    (whole, _), (split, _) = models
    assert common.device_split(split) and not common.device_split(whole)
    assert next(split.parameters()).device.type == "meta"  # offloaded: no device to read off it
    assert common.input_device(split) == common.input_device(whole) == torch.device("cpu")
    args = ee.parse_args(["--model", common.TINY_MODEL, "--device-map", "auto"])
    record = runs.run_config(args, split)["model"]
    assert record["device_map"] == SPLIT and record["device"] == "cpu"
    assert runs.run_config(args, whole)["model"]["device_map"] is None
    assert "device_map" not in runs.comparable_args(args)  # a run resumes on another split


def test_offloaded_weights_give_the_same_z_basis_and_fingerprint(models):
    (whole, _), (split, _) = models
    for layer in (1, 2):  # on disk, in CPU memory
        assert torch.equal(common.z_basis(split, layer, 8, fold_norm=True),
                           common.z_basis(whole, layer, 8, fold_norm=True))
    assert common.model_fingerprint(split) == common.model_fingerprint(whole)


def _patched_decode(model, tok, engine):
    """Experiment A's calls: a shared prefill at layer 2, rows selected from it, a patch of every
    condition and scope, its readouts (the patch's size and how far it moves layer 3's attention),
    then the rows decoded and scored (with the language margin)."""
    ids, mask, _ = common.tokenize_left_padded(tok, MIXED)
    prefill = decoding.shared_prefill(model, ids, mask, 2)
    rows = decoding.select_prefill(prefill, [0, 1, 2, 3, 4])
    patch = conditions(model, 5)
    readouts = patching.patch_readouts(model, patch, rows["hidden"], rows["attention_mask"],
                                       patching.attention_read_layer(model, patch.stream))
    answers = [tok(f" {n}", add_special_tokens=False)["input_ids"] for n in (12, 7, 48, 3, 120)]
    out = decoding.generate_and_score(
        model, rows["input_ids"], rows["attention_mask"], 6, patch, stop_ids=[0],
        score=[answers, answers[::-1]], prefill=rows, return_logits=True, engine=engine,
        languages=common.LanguageClasses(tok), margin_sets=[0])
    return dict(out, **readouts)


def test_patched_decode_and_scores_are_the_same_on_the_split_model(models, capsys):
    (whole, tok), (split, _) = models
    reference = _patched_decode(whole, tok, "eager")
    assert reference["attn_tv_last"].isfinite().all() and reference["attn_tv_last"].max() > 0
    for engine in ("fast", "auto"):  # neither can run fast on a split model: the eager loop runs
        out = _patched_decode(split, tok, engine)
        for name in ("tokens", "lengths", "logits", "top1", "patch_size", "attn_tv_last",
                     "attn_tv_all"):
            assert torch.equal(out[name], reference[name]), name
        for name in ("scores", "first_scores", "margins"):  # margins: NaN on the second set
            for a, b in zip(out[name], reference[name]):
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and "split across devices" in notes[0] and "eager" in notes[0]
    assert decoding.resolve_engine("fast", split) == "eager"


def _pairs(tok):
    texts = ["Tom buys 3 apples for 4 dollars each. How much does he pay?",
             "A train travels 60 kilometers per hour for 2 hours. How far does it go?",
             "老师把24支铅笔平均分给6个学生，每个学生得到几支？",
             "小明有3个苹果，又买了5个。他现在有多少个苹果？"]
    return [{"id": str(i), "en": t, "zh": texts[-1 - i], "answer": a}
            for i, (t, a) in enumerate(zip(texts, [12, 120, 4, 8]))]


def _interchange(model, tok):
    """Experiment E's clean states and patched rows at layer 1 (Z of layer 2, a random draw, none,
    full) with the basis layer 3's attention read out, and DAS's loss and gradient at layer 1 on
    the same state."""
    pairs = _pairs(tok)
    state = ee.prepare(model, tok, pairs, {"en": "Q: {question} A:", "zh": "问：{question} 答："},
                       [1, 2, 3, 0], 2, 2)
    d = common.hidden_size(model)
    named = [("z_basis", common.z_basis(model, 2, 4))]
    conds = ee.make_conditions(d, 4, named, 1, 0)
    batches = ee.make_batches(state, range(len(pairs)), len(conds.names), 3, torch.float32)
    rows = ee.run_rows(model, state, 1, conds, batches, basis_layer=3)
    data = das.das_data(model, state, [(0, 1), (1, 2), (2, 3), (3, 0)], 1, 3)
    basis = common.random_basis(d, 4, 0).requires_grad_(True)
    loss = das.interchange_loss(model, state.prefixes, data.block, data.hidden, data.sources, 1,
                                basis)
    loss.backward()
    return state, rows, float(loss.detach()), basis.grad


def test_interchange_rows_and_das_are_the_same_on_the_split_model(models):
    (whole, tok), (split, _) = models
    for model in (whole, split):
        model.requires_grad_(False)
    state, rows, loss, grad = _interchange(whole, tok)
    state_s, rows_s, loss_s, grad_s = _interchange(split, tok)
    assert rows.attn_tv_last.notna().all() and rows.attn_tv_last.max() > 0  # read out below 3
    pd.testing.assert_frame_equal(rows_s, rows, check_exact=True)
    pd.testing.assert_frame_equal(state_s.clean, state.clean, check_exact=True)
    assert torch.equal(state_s.hidden, state.hidden) and torch.equal(state_s.zh_last, state.zh_last)
    assert loss_s == loss and np.isfinite(loss)
    assert grad.abs().sum() > 0 and torch.equal(grad_s, grad)


def test_question_set_rows_are_the_same_on_the_split_model(models):
    """E's second position set: the question's tokens patched at layer 1 from a counterfactual
    partner, the basis layer 3's attention read out."""
    (whole, tok), (split, _) = models
    kept, partners, _ = question.partners(bank.generate_bank(1)[:4], seed=0)
    template = problems.load_prompts()["templates"]["direct"]
    conds = ee.make_conditions(common.hidden_size(whole), 4, [], 1, 0)
    states, rows = [], []
    for model in (whole, split):
        states.append(question.prepare(model, tok, kept, partners, template, "zh", 3))
        rows.append(question.run_rows(model, states[-1], 1, conds, 4, basis_layer=3))
    assert rows[0].attn_tv_last.notna().all()
    pd.testing.assert_frame_equal(rows[1], rows[0], check_exact=True)
    pd.testing.assert_frame_equal(states[1].clean, states[0].clean, check_exact=True)
    assert torch.equal(states[1].source, states[0].source)


@pytest.mark.parametrize("pool,drop_numbers", [("mean", False), (None, True)])
def test_activations_are_the_same_on_the_split_model(models, pool, drop_numbers):
    (whole, tok), (split, _) = models
    texts = [p[lang] for p in _pairs(tok) for lang in ("en", "zh")]
    a, b = [common.extract_activations(model, tok, texts, [-1, 0, 1, 2, 3], pool=pool,
                                       drop_numbers=drop_numbers, batch_size=3, cache_dir=None)
            for model in (whole, split)]
    if pool is None:
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    else:
        assert torch.equal(a, b)


def test_a_checkpoint_folder_loads_split_by_a_json_map(models, tmp_path):
    """The command line's path: a folder read by from_pretrained(device_map=...) with the map in
    a JSON file (disk-offloaded weights are read from the checkpoint itself)."""
    (whole, tok), _ = models
    whole.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    (tmp_path / "map.json").write_text(json.dumps(SPLIT))
    split, tok2 = common.load_model(str(tmp_path / "tiny"), device_map=str(tmp_path / "map.json"))
    assert split.hf_device_map == SPLIT and common.device_split(split)
    ids, mask, _ = common.tokenize_left_padded(tok2, MIXED)
    captured = [common.capture_layer_outputs(m, ids, mask, [-1, 1, 3]) for m in (whole, split)]
    assert all(torch.equal(captured[0][l], captured[1][l]) for l in (-1, 1, 3))
    assert torch.equal(common.z_basis(split, 3, 4), common.z_basis(whole, 3, 4))


@pytest.mark.parametrize("flags,message", [
    (["--device-map", "everywhere"], "pass one of auto, balanced"),
    (["--device-map", "auto", "--device", "cpu"], "pass --device or --device-map, not both"),
    (["--device-map", "{map}"], "this machine has 0 visible GPU(s), the map names cuda:0, cuda:1"),
    (["--device-map", "{bad}"], "write a non-empty JSON object"),
])
@pytest.mark.parametrize("script", ["exp_a_patching", "exp_b_residual", "exp_c_ard_mmd",
                                    "exp_d_bridge", "exp_e_layer_sweep", "study"])
def test_a_map_that_cannot_be_used_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, script,
                                                          flags, message):
    import importlib
    module = importlib.import_module(script)
    (tmp_path / "map.json").write_text(json.dumps({"model.layers.0": 0, "lm_head": "cuda:1"}))
    (tmp_path / "bad.json").write_text(json.dumps({"model.layers.0": "gpu"}))
    flags = [f.format(map=tmp_path / "map.json", bad=tmp_path / "bad.json") for f in flags]
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        runs.run_cli(module.main, module.parse_args(["--model", common.TINY_MODEL, *flags]))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1
    assert list((tmp_path / "run").iterdir()) == []  # nothing written
