"""Optimal-transport sources for Experiment A's `ot` source (POT): each English prompt position
takes the barycentric image of an exact transport plan between the English and the Chinese
prompt's token states, so a source can be patched position by position without aligning tokens.
"""
import numpy as np
import torch


def ot_source(en_states, zh_states, scale=None):
    """Per-English-token source from an exact OT plan (uniform marginals, squared Euclidean cost).

    en_states: (T_en, d), zh_states: (T_zh, d). Coordinates are divided by `scale` (d,) for the
    cost only, so a few huge coordinates do not decide the alignment.
    Returns (source (T_en, d) float32, plan (T_en, T_zh) float64): source[t] is the barycentric
    image sum_s plan[t, s] zh[s] / sum_s plan[t, s].
    """
    import ot
    en, zh = en_states.float().cpu(), zh_states.float().cpu()
    if scale is not None:
        scale = scale.float().cpu()
        en_cost, zh_cost = en / scale, zh / scale
    else:
        en_cost, zh_cost = en, zh
    cost = ot.dist(en_cost.double().numpy(), zh_cost.double().numpy(), "sqeuclidean")
    plan = ot.emd(np.full(len(en), 1.0 / len(en)), np.full(len(zh), 1.0 / len(zh)), cost)
    weights = torch.from_numpy(plan / plan.sum(1, keepdims=True)).float()
    return weights @ zh, plan


def robust_scale(states):
    """Per-coordinate IQR over all tokens of `states` (list of (T, d)), floored to avoid zeros."""
    pooled = torch.cat(states).float()
    subsample = torch.randperm(len(pooled), generator=torch.Generator().manual_seed(0))[:20000]
    q = torch.quantile(pooled[subsample], torch.tensor([0.25, 0.75]), 0)  # quantile caps its input
    iqr = q[1] - q[0]
    return iqr.clamp(min=1e-3 * float(iqr.median()) + 1e-8)
