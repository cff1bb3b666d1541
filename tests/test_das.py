"""DAS: the learned subspace stays orthonormal, recovers a planted subspace, keeps the step with the
best validation value; principal angles and overlap; gradients reach only the subspace."""
import numpy as np
import pytest
import torch

import common
from zcausal import das, interchange


def test_learned_subspace_starts_at_a_seeded_random_orthonormal_basis():
    learned = das.LearnedSubspace(24, 3, seed=5)
    basis = learned.basis().detach()
    assert basis.shape == (3, 24)
    assert torch.allclose(basis @ basis.T, torch.eye(3), atol=1e-5)
    assert torch.allclose(basis, common.random_basis(24, 3, 5), atol=1e-5)


def test_training_does_not_depend_on_the_global_generator():
    """The same seed trains the same path whatever ran before (a resumed run skips earlier k)."""
    target = common.random_basis(24, 3, 1)
    bases = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        learned = das.LearnedSubspace(24, 3, seed=5)
        optimiser = torch.optim.Adam(learned.parameters(), lr=0.05)
        for _ in range(3):
            optimiser.zero_grad()
            (-(learned.basis() @ target.T).pow(2).sum()).backward()
            optimiser.step()
        bases.append(learned.basis().detach())
    assert torch.equal(bases[0], bases[1])


def planted_problem(d=24, k=3, n_classes=8, seed=0):
    """A synthetic model whose output reads only span(U), U a known (k, d) basis: logits =
    W U h. Interchanging within S moves the output to the source's class exactly when S
    contains span(U)."""
    gen = torch.Generator().manual_seed(seed)
    planted = common.random_basis(d, k, 123)
    readout = torch.randn(n_classes, k, generator=gen) * 10

    def loss(basis, base, source):
        target = (source @ planted.T @ readout.T).argmax(-1)
        patched = base + ((source - base) @ basis.T) @ basis
        return torch.nn.functional.cross_entropy(patched @ planted.T @ readout.T, target)

    return planted, loss, gen


def test_das_recovers_a_planted_subspace():
    d, k = 24, 3
    planted, loss, gen = planted_problem(d, k)
    val_base, val_source = torch.randn(512, d, generator=gen), torch.randn(512, d, generator=gen)

    def loss_fn(basis):
        return loss(basis, torch.randn(256, d, generator=gen), torch.randn(256, d, generator=gen))

    def val_fn(basis):
        return float(loss(basis, val_base, val_source))

    learned = das.LearnedSubspace(d, k, seed=7)
    start = das.principal_angles(learned.basis().detach(), planted)
    basis, history = das.train_subspace(learned, loss_fn, val_fn, steps=400, lr=0.05,
                                        eval_every=50)
    angles = das.principal_angles(basis, planted)
    assert start.max() > 30  # it did not start there
    assert angles.max() < 10, angles
    assert torch.allclose(basis @ basis.T, torch.eye(k), atol=1e-4)
    for seed in range(5):  # random subspaces of the same size are not close
        assert das.principal_angles(common.random_basis(d, k, 1000 + seed), planted).max() > 10
    assert history[-1]["val"] < history[0]["val"]


def test_train_subspace_keeps_the_step_with_the_best_validation_value():
    values = iter([3.0, 1.0, 2.0, 5.0])
    seen = []

    def val_fn(basis):
        seen.append(basis.clone())
        return next(values)

    learned = das.LearnedSubspace(10, 2, seed=0)
    target = common.random_basis(10, 2, 1)
    basis, history = das.train_subspace(
        learned, lambda b: -(b @ target.T).pow(2).sum(), val_fn, steps=6, lr=0.1, eval_every=2)
    assert [h["step"] for h in history] == [0, 2, 4, 6]
    assert torch.equal(basis, seen[1])
    assert not torch.allclose(seen[1], seen[3])


def test_principal_angles_and_overlap():
    a = common.random_basis(30, 4, 0)
    assert np.allclose(das.principal_angles(a, a), 0, atol=1e-5)
    assert das.overlap(a, a) == pytest.approx(1)
    rotated = torch.linalg.qr(torch.randn(4, 4))[0] @ a  # same subspace, other basis
    assert np.allclose(das.principal_angles(rotated, a), 0, atol=1e-4)
    e = torch.eye(30)
    assert np.allclose(das.principal_angles(e[:4], e[4:8]), 90)
    assert das.overlap(e[:4], e[4:8]) == 0
    overlaps = [das.overlap(common.random_basis(30, 4, s), common.random_basis(30, 4, 100 + s))
                for s in range(300)]
    assert np.mean(overlaps) == pytest.approx(4 / 30, rel=0.15)


@pytest.mark.parametrize("d,k,n", [(30, 6, 100), (64, 20, 40)])
def test_mean_cos2_of_random_subspaces_is_k_over_d_on_average(d, k, n):
    """das_angles' mean_cos2 is the mean cos² of the principal angles, and its chance value k / d
    is what random subspaces give on average (n draws; a generous 15% tolerance: the mean's
    standard error is about 2.5% and 1% of k / d for these sizes)."""
    basis = common.random_basis(d, k, 7)
    draws = [common.random_basis(d, k, 1000 + s) for s in range(n)]
    angles = das.das_angles(basis, [("self", -1, basis)], draws, k)
    assert np.allclose(angles.chance_mean_cos2, k / d)
    assert angles.mean_cos2.iloc[0] == pytest.approx(1)
    random = angles[angles.versus == "random"]
    assert random.mean_cos2.mean() == pytest.approx(k / d, rel=0.15)
    cos2 = np.cos(np.radians(das.principal_angles(basis, draws[0]))) ** 2
    assert random.mean_cos2.iloc[0] == pytest.approx(cos2.mean(), abs=1e-6)


def test_interchange_loss_trains_only_the_subspace(tiny):
    model, tok = tiny
    model.requires_grad_(False)
    texts = ["Tom buys 3 apples. The answer is ", "A train goes 60 km. The answer is "]
    prefixes = interchange.encode_prefixes(model, interchange.prompt_ids(tok, texts), 1)
    block = interchange.build_block(prefixes, [0, 1], [[[5, 6]], [[7]]])
    with torch.no_grad():
        hidden = interchange.run_layers(model, prefixes, block, interchange.embed(model, block),
                                        0, stop=2)
    learned = das.LearnedSubspace(common.hidden_size(model), 4, seed=0)
    sources = torch.randn(2, 1, common.hidden_size(model)) * 3
    loss = das.interchange_loss(model, prefixes, block, hidden, sources, 1, learned.basis())
    loss.backward()
    grads = [p.grad for p in learned.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters())


def test_loss_scores_only_the_answer_positions_and_is_unchanged(tiny):
    """segment_logp (the LM head at the answer's positions only) equals score()'s logp of that
    segment, for answers of different lengths (padding) and either segment of a two-segment
    block; DAS's loss equals minus the mean of patched_scores' logp, and so do its gradients."""
    model, tok = tiny
    model.requires_grad_(False)
    texts = ["Tom buys 3 apples. The answer is ", "A train goes 60 km. The answer is ",
             "She reads 12 pages. The answer is "]
    prefixes = interchange.encode_prefixes(model, interchange.prompt_ids(tok, texts), 2)
    block = interchange.build_block(prefixes, [0, 1, 2],
                                    [[[5, 6, 7], [9]], [[8], [10, 11]], [[12, 13], [14, 15, 16]]])
    d = common.hidden_size(model)
    with torch.no_grad():
        hidden = interchange.run_layers(model, prefixes, block, interchange.embed(model, block),
                                        0, stop=2)
        final = interchange.run_layers(model, prefixes, block, hidden, 2)
        full = interchange.score(model, final, block)["logp"]
        for segment in (0, 1):
            fast = interchange.segment_logp(model, final, block, segment)
            assert torch.allclose(fast, full[:, segment], atol=1e-5, rtol=0), segment
    sources = torch.randn(3, 2, d) * 3
    losses, grads = [], []
    for fast in (True, False):
        basis = common.random_basis(d, 4, 0).requires_grad_(True)
        if fast:
            loss = das.interchange_loss(model, prefixes, block, hidden, sources, 1, basis,
                                        segment=1)
        else:
            patch = interchange.subspace_patch(basis[None].expand(3, -1, -1),
                                               torch.zeros(3, dtype=torch.bool), sources)
            loss = -interchange.patched_scores(model, prefixes, block, 1, hidden,
                                               patch)["logp"][:, 1].mean()
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append(basis.grad)
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_same_intervention_as_pyvene_when_installed(tiny):
    """Cross-check against pyvene's LowRankRotatedSpaceIntervention (skipped where pyvene is not
    installed: it is not a requirement, see the README's Experiment E section)."""
    pv = pytest.importorskip("pyvene")
    model, tok = tiny
    layer, k = 2, 4
    config = pv.IntervenableConfig(representations=[{
        "layer": layer, "component": "block_output", "low_rank_dimension": k, "unit": "pos"}],
        intervention_types=pv.LowRankRotatedSpaceIntervention)
    intervenable = pv.IntervenableModel(config, model)
    base, source = (tok([t], return_tensors="pt").input_ids
                    for t in ("Tom buys 3 apples. The answer is ", "答案是42。答案是"))
    _, patched = intervenable({"input_ids": base}, [{"input_ids": source}], unit_locations={
        "sources->base": ([[[source.shape[1] - 1]]], [[[base.shape[1] - 1]]])})
    intervention = list(intervenable.interventions.values())[0]
    intervention = intervention[0] if isinstance(intervention, tuple) else intervention
    basis = intervention.rotate_layer.weight.detach().T  # pyvene stores (d, k)
    prefixes = interchange.encode_prefixes(model, [base[0].tolist()], 1)
    block = interchange.build_block(prefixes, [0], [[[int(base[0, -1])]]])
    states = common.capture_layer_outputs(model, source, torch.ones_like(source), [layer])[layer]
    with torch.no_grad():
        clean = interchange.run_layers(model, prefixes, block, interchange.embed(model, block), 0,
                                       stop=layer + 1)
        ours = interchange.patched_scores(
            model, prefixes, block, layer, clean,
            interchange.subspace_patch(basis[None], torch.tensor([False]), states[:, -1:]))
    logp = torch.log_softmax(patched.logits[0, -1].detach().float(), -1)[int(base[0, -1])]
    assert float(ours["logp"][0, 0]) == pytest.approx(float(logp), abs=1e-4)



def test_progress_lines_are_plain_sentences_without_nan():
    """DAS progress as readable lines: no dict, no training loss before the first step."""
    first = das.progress_line(20, {"step": 0, "train_loss": np.nan, "val": 3.2149})
    later = das.progress_line(20, {"step": 20, "train_loss": 2.951, "val": 2.8})
    assert first == "DAS k = 20, step 0: validation loss 3.21"
    assert later == ("DAS k = 20, step 20: training loss 2.95 (mean since the last evaluation), "
                     "validation loss 2.8")
    assert "nan" not in first + later and "{" not in first + later
