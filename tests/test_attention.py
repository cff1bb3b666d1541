"""The basis layer's attention recomputed from its input (zcausal/attention.py): equal to Hugging
Face's eager attention, zero change for a no-op patch, and the readout experiment A records."""
import copy

import pytest
import torch

import common
from helpers import MIXED
from zcausal import attention, patching


@pytest.fixture
def batch(tiny):
    model, tok = tiny
    ids, mask, _ = common.tokenize_left_padded(tok, MIXED)  # five lengths: left padding exercised
    return model, ids, mask


def test_layer_attention_equals_eager_attention_on_every_real_row(batch):
    model, ids, mask = batch
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        reference = eager(input_ids=ids, attention_mask=mask, output_attentions=True,
                          position_ids=common.position_ids_from_mask(mask)).attentions
    real = mask.bool()
    for layer in range(common.num_layers(model)):
        entering = common.capture_layer_outputs(model, ids, mask, [layer - 1])[layer - 1]
        ours = attention.layer_attention(model, layer, entering, mask)
        assert ours.shape == reference[layer].shape
        # padded query rows are undefined in Hugging Face's mask; every real row must agree
        rows = real[:, None, :, None].expand_as(ours)
        torch.testing.assert_close(ours[rows], reference[layer].float()[rows], atol=1e-5, rtol=0)
        sums = ours.sum(-1)[real[:, None, :].expand(-1, ours.shape[1], -1)]
        torch.testing.assert_close(sums, torch.ones_like(sums))
        assert (ours[~real[:, None, None, :].expand_as(ours)] == 0).all()  # padding never read


def test_total_variation_is_zero_for_the_same_rows_and_one_for_disjoint_ones():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert float(attention.total_variation(p, p)) == 0
    assert float(attention.total_variation(p, torch.tensor([[0.0, 0.0, 0.3, 0.7]]))) == 1


def test_a_noop_patch_moves_no_attention_and_a_z_patch_at_the_input_does(batch):
    model, ids, mask = batch
    layer, k = 2, 8
    entering = common.capture_layer_outputs(model, ids, mask, [layer - 1])[layer - 1]
    B, d = ids.shape[0], common.hidden_size(model)
    source = torch.randn(B, d, generator=torch.Generator().manual_seed(1)) * 3
    z = common.z_basis(model, layer, k)
    noop = common.SubspacePatch(layer=layer, basis=torch.zeros(B, k, d), site="input",
                                complement=torch.ones(B, dtype=torch.bool),
                                source_mean=source, source_tokens=entering.float(),
                                patch_generated=torch.zeros(B, dtype=torch.bool))
    out = patching.patch_readouts(model, noop, entering, mask, layer)
    assert (out["attn_tv_last"] == 0).all() and (out["attn_tv_all"] == 0).all()
    assert (out["patch_size"] == 0).all()
    patch = common.SubspacePatch(layer=layer, basis=z[None].repeat(B, 1, 1), site="input",
                                 complement=torch.zeros(B, dtype=torch.bool), source_mean=source,
                                 patch_generated=torch.zeros(B, dtype=torch.bool))
    out = patching.patch_readouts(model, patch, entering, mask, layer)
    assert (out["attn_tv_all"] > 0).all() and (out["attn_tv_all"] <= 1).all()
    assert (out["patch_size"] > 0).all()


def test_the_readout_reads_the_layer_after_the_patched_stream():
    """--site input at layer b patches stream b - 1, read first by b (the basis layer itself);
    --site output patches stream b, read first by b + 1; past the last layer nothing reads it."""
    model = common.load_model(common.TINY_MODEL, device="cpu")[0]
    assert patching.attention_read_layer(model, 1) == 2
    assert patching.attention_read_layer(model, -1) == 0
    assert patching.attention_read_layer(model, common.num_layers(model) - 1) is None
