"""The ARD-RBF kernel, the unbiased MMD^2 between token clouds, Experiment C's two objectives and
their batched fit (Adam on log lengthscales), retrieval scores and the overlap with the SVD mask.
No model and no files here: exp_c_ard_mmd.py feeds it token clouds.

Kernel: k_l(x, y) = exp(-1/2 sum_j (x_j - y_j)^2 / l_j^2), parameterised by log l; w_j = 1/l_j^2.
MMD^2_u(a, b) = mean_{t!=t'} k(a_t, a_t') + mean_{s!=s'} k(b_s, b_s') - 2 mean_{t,s} k(a_t, b_s).
Clouds are padded to a common length with masks, so every pair (and every fit) is one batched op.
"""
from dataclasses import dataclass

import numpy as np
import torch

TAU = 0.1              # softmax temperature of the contrastive objective
PLATEAU_EVERY = 50     # read the loss on the host only this often


# ----------------------------------------------------------------------------------------------
# Token clouds

def compute_standardisation(clouds, method="robust"):
    """Per-coordinate centre and scale (d,) from the pooled tokens of `clouds` (list of (T, d)).
    robust: median and IQR / 1.349 (the sd of a Gaussian); meansd: mean and sd."""
    pooled = torch.cat(clouds, 0).float()
    if method == "robust":
        q = torch.quantile(pooled, torch.tensor([0.25, 0.5, 0.75]), dim=0)
        centre, scale = q[1], (q[2] - q[0]) / 1.349
    else:
        centre, scale = pooled.mean(0), pooled.std(0)
    return centre, torch.where(scale > 1e-6, scale, torch.ones_like(scale))


def median_pairwise_distance(clouds, max_tokens=2000, seed=0):
    """Median Euclidean distance between pooled tokens (a seeded subsample of max_tokens)."""
    pooled = torch.cat(clouds, 0).float()
    gen = torch.Generator().manual_seed(seed)
    pooled = pooled[torch.randperm(len(pooled), generator=gen)[:max_tokens]]
    dist = torch.cdist(pooled, pooled)
    return float(dist[torch.triu_indices(len(pooled), len(pooled), 1).unbind()].median())


@dataclass
class Clouds:
    """N token clouds, padded. x (N, T, d) float32; mask (N, T) bool; within_w (N, T, T), the
    unbiased within-cloud weights 1/(n(n-1)) off the diagonal, 0 on padding; flat (P, d), the real
    tokens of all clouds; seg (N, P), 1/n_i where token p belongs to cloud i. All on one device."""
    x: torch.Tensor
    mask: torch.Tensor
    within_w: torch.Tensor
    flat: torch.Tensor
    seg: torch.Tensor


def pad_clouds(clouds, length=None):
    """List of (T_i, d) -> x (N, T, d) zero-padded to T = max T_i (or `length`), mask (N, T)."""
    length = length or max(len(c) for c in clouds)
    x = torch.zeros(len(clouds), length, clouds[0].shape[-1])
    mask = torch.zeros(len(clouds), length, dtype=torch.bool)
    for i, c in enumerate(clouds):
        x[i, :len(c)], mask[i, :len(c)] = c, True
    return x, mask


def make_clouds(x, mask, device="cpu"):
    """Clouds from padded x (N, T, d) and mask (N, T); whatever sits under the padding is ignored."""
    x, mask = x.to(device, torch.float32), mask.to(device)
    n = mask.sum(1).float()
    if bool((n < 2).any()):
        raise ValueError("every cloud needs at least 2 tokens for the unbiased MMD")
    off_diag = ~torch.eye(x.shape[1], dtype=torch.bool, device=device)
    within_w = (mask[:, :, None] & mask[:, None, :] & off_diag).float() / (n * (n - 1))[:, None, None]
    owner = torch.arange(len(x), device=device)[:, None].expand_as(mask)[mask]
    seg = (owner[None, :] == torch.arange(len(x), device=device)[:, None]).float() / n[:, None]
    return Clouds(x=x, mask=mask, within_w=within_w, flat=x[mask], seg=seg)


# ----------------------------------------------------------------------------------------------
# ARD-RBF kernel and unbiased MMD^2, batched over fits F (rows of inv_l) and over clouds

def ard_kernel(a, b, inv_l):
    """k(a_p, b_q) = exp(-1/2 sum_j (a_pj - b_qj)^2 / l_j^2) for each fit f: a (..., P, d),
    b (..., Q, d), inv_l (F, d) -> (F, ..., P, Q). Squared distances as
    |a|_w^2 + |b|_w^2 - 2 (a w) b^T with w = 1/l^2: one scaled copy of a per fit and matmuls
    (the squared norms are matmuls of the fixed a^2 with w), so no (F, ..., d) tensor is squared."""
    w = inv_l.pow(2)
    extra = a.dim() - 1  # batch dims of a plus its token dim
    w_a = w.view(len(w), *([1] * (extra - 1)), 1, -1)
    sq_a = torch.movedim(a.pow(2) @ w.T, -1, 0)  # (F, ..., P)
    sq_b = torch.movedim(b.pow(2) @ w.T, -1, 0)  # (F, ..., Q)
    cross = (a[None] * w_a) @ b.transpose(-1, -2)[None]
    return torch.exp(-0.5 * (sq_a[..., :, None] + sq_b[..., None, :] - 2 * cross).clamp_min(0))


def within_terms(c, inv_l):
    """Unbiased mean_{t!=t'} k(x_t, x_t') per cloud: inv_l (F, d) -> (F, N)."""
    return (ard_kernel(c.x, c.x, inv_l) * c.within_w).sum((-1, -2))


def mmd2_paired(a, b, inv_l):
    """MMD^2_u(a_i, b_i) for each i: (F, N). a and b hold the same number of clouds."""
    weight = a.mask[:, :, None].float() * b.mask[:, None, :].float()
    weight = weight / (a.mask.sum(1) * b.mask.sum(1)).float()[:, None, None]
    cross = (ard_kernel(a.x, b.x, inv_l) * weight).sum((-1, -2))
    return within_terms(a, inv_l) + within_terms(b, inv_l) - 2 * cross


def mmd2_matrix(a, b, inv_l):
    """D[f, i, i'] = MMD^2_u(a_i, b_i') for all pairs: (F, N_a, N_b). One kernel matrix between
    all real tokens of a and of b, reduced to cloud means by the segment matrices."""
    cross = a.seg @ ard_kernel(a.flat, b.flat, inv_l) @ b.seg.T
    return within_terms(a, inv_l)[:, :, None] + within_terms(b, inv_l)[:, None, :] - 2 * cross


# ----------------------------------------------------------------------------------------------
# Objectives: (log_l (F, d), lambdas (F,)) -> total, data term, penalty, each (F,)

def plan_loss(zh, en, log_l, lambdas):
    """The plan's C.3 as written: sum_i MMD^2_u(zh_i, en_i) + lambda * sum_j 1/l_j."""
    data = mmd2_paired(zh, en, torch.exp(-log_l)).sum(1)
    penalty = lambdas * torch.exp(-log_l).sum(1)
    return data + penalty, data, penalty


def contrastive_loss(zh, en, log_l, lambdas, l_ref, tau=TAU):
    """2N x the retrieval cross-entropy (both directions) + 2N * lambda * mean_j (l_ref / l_j)^2.

    The penalty is in the data term's units: at the isotropic start (every l_j = l_ref) it is
    2N * lambda, so lambda is the cross-entropy (nats per query; chance is log N) that switching on
    the whole isotropic kernel costs. Near that start the coordinate j pays while it earns
    (2 / tau) * gap_j / (2N) * d / l_ref^2 = gap_j / (tau N) * d / l_ref^2 (gap_j as in the
    docstring of exp_c_ard_mmd.py); for standardised coordinates d / l_ref^2 is about 1/2, so the
    lambda at which a coordinate leaves Z depends on neither d nor N. Unscaled, lambda * sum_j w_j
    was about 0.5 lambda against a data term near 38, and no lambda of the plan's grid changed
    anything."""
    dist = mmd2_matrix(zh, en, torch.exp(-log_l))  # (F, N, N), row: zh_i, column: en_i'
    n = dist.shape[1]
    data = 2 * n * contrastive_ce(dist, tau)
    penalty = 2 * n * lambdas * (l_ref ** 2 * torch.exp(-2 * log_l)).mean(1)
    return data + penalty, data, penalty


def objective_fn(name, zh, en, tau, l_ref):
    """The loss of objective `name` ("plan" or "contrastive") on training clouds zh, en."""
    if name == "plan":
        return lambda log_l, lambdas: plan_loss(zh, en, log_l, lambdas)
    return lambda log_l, lambdas: contrastive_loss(zh, en, log_l, lambdas, l_ref, tau)


def fit_lengthscales(loss_fn, log_l0, lambdas, log_l_ref, args, on_step=None):
    """Adam on log l for F independent fits at once (Adam is elementwise, so batching them is
    exact). log_l0 (F, d); lambdas (F,). Every PLATEAU_EVERY steps the losses come to the host; a
    fit whose loss moved by less than plateau_tol (relative) since the last check, after
    min_steps, is frozen at that point. Returns final log l (F, d) on the CPU, the trace
    (n_log, F, 4: loss, data, penalty, |Z|) with NaN after a fit stopped, and steps run (F,).
    args: lr, steps, min_steps, plateau_tol, log_every. on_step(): called after every step."""
    log_l = log_l0.clone().requires_grad_(True)
    opt = torch.optim.Adam([log_l], lr=args.lr)
    n_fits = len(log_l0)
    trace = torch.full((args.steps // args.log_every + 1, n_fits, 4), float("nan"),
                       device=log_l0.device)
    final, stopped = log_l0.detach().clone(), np.full(n_fits, args.steps)
    active, last = np.ones(n_fits, dtype=bool), None
    for step in range(args.steps + 1):
        total, data, penalty = loss_fn(log_l, lambdas)
        if step % args.log_every == 0:
            with torch.no_grad():
                z_size = (log_l < log_l_ref).sum(1).float()
                trace[step // args.log_every] = torch.stack([total, data, penalty, z_size], 1)
        if step % PLATEAU_EVERY == 0:
            now = total.detach().cpu().numpy()
            if last is not None and step >= args.min_steps:
                flat = active & (np.abs(now - last) <= args.plateau_tol * np.maximum(np.abs(last), 1e-8))
                rows = torch.from_numpy(flat).to(final.device)
                final[rows] = log_l.detach()[rows]
                stopped[flat], active = step, active & ~flat
            last = now
        if step == args.steps or not active.any():
            break
        opt.zero_grad(set_to_none=True)
        total.sum().backward()
        opt.step()
        if on_step is not None:
            on_step()
    rows = torch.from_numpy(active).to(final.device)
    final[rows] = log_l.detach()[rows]
    trace = trace.cpu()
    for f in range(n_fits):
        trace[stopped[f] // args.log_every + 1:, f] = float("nan")
    return final.cpu(), trace, stopped


# ----------------------------------------------------------------------------------------------
# Evaluation

def contrastive_ce(dist, tau):
    """Mean cross-entropy of retrieving the partner by softmax(-D / tau), both directions:
    dist (F, N, N) -> (F,). Chance (a constant kernel) is log N."""
    logits = -dist / tau
    n = dist.shape[1]
    return -(torch.diagonal(logits.log_softmax(2), dim1=1, dim2=2).sum(1)
             + torch.diagonal(logits.log_softmax(1), dim1=1, dim2=2).sum(1)) / (2 * n)


@torch.no_grad()
def evaluate_retrieval(zh, en, log_l, tau=TAU):
    """Top-1 retrieval accuracy by argmin MMD^2_u (mean of zh->en and en->zh; chance 1/N) and the
    contrastive cross-entropy per query (chance log N) of each fit: two (F,) numpy arrays."""
    dist = mmd2_matrix(zh, en, torch.exp(-log_l.to(zh.x.device)))
    target = torch.arange(dist.shape[1], device=dist.device)
    zh_to_en = (dist.argmin(2) == target).float().mean(1)
    en_to_zh = (dist.argmin(1) == target).float().mean(1)
    return ((zh_to_en + en_to_zh) / 2).cpu().numpy(), contrastive_ce(dist, tau).cpu().numpy()


def overlap_chance(d, a, b, overlap, band=(0.025, 0.975)):
    """The overlap of two selections of a and b coordinates out of d against chance: for a random
    selection of a coordinates its overlap with a fixed b is X ~ Hypergeom(d, b, a).

    Returns expected (a b / d), lo and hi (the `band` quantiles of X: 95% of random selections
    overlap within [lo, hi]), p_enrichment = P(X >= overlap) and p_depletion = P(X <= overlap),
    each one-sided. A large p_enrichment says "no enrichment", not "no overlap": with a b / d
    below 1, overlap 0 is what a random selection gives most of the time."""
    from scipy.stats import hypergeom
    dist = hypergeom(int(d), int(b), int(a))
    return {"overlap_expected": a * b / d, "overlap_lo": int(dist.ppf(band[0])),
            "overlap_hi": int(dist.ppf(band[1])),
            "p_enrichment": float(min(1.0, dist.sf(overlap - 1))),
            "p_depletion": float(min(1.0, dist.cdf(overlap)))}


def compute_overlap(in_z, z_energy):
    """ARD's Z (bool (d,)) against the SVD mask's top-|Z| coordinates by diag(P_Z): as many
    coordinates as ARD's Z holds, so a = b = |Z| (overlap_chance).

    overlap: coordinates in both; overlap_expected: |Z|^2 / d; overlap_lo, overlap_hi: the 95%
    range of a random selection's overlap; overlap_p: P(X >= overlap) (enrichment) and
    overlap_p_depletion: P(X <= overlap), X ~ Hypergeom(d, |Z|, |Z|); energy_share: sum of
    diag(P_Z) over Z / k; energy_chance: |Z| / d, its expected value for a random selection."""
    in_z, z_energy = np.asarray(in_z, bool), np.asarray(z_energy, float)
    d, m = len(in_z), int(in_z.sum())
    if m == 0:
        return {"overlap": 0, "overlap_expected": 0.0, "overlap_lo": 0, "overlap_hi": 0,
                "overlap_p": 1.0, "overlap_p_depletion": 1.0, "energy_share": 0.0,
                "energy_chance": 0.0}
    top = np.argsort(-z_energy, kind="stable")[:m]
    overlap = int(in_z[top].sum())
    chance = overlap_chance(d, m, m, overlap)
    return {"overlap": overlap, "overlap_expected": chance["overlap_expected"],
            "overlap_lo": chance["overlap_lo"], "overlap_hi": chance["overlap_hi"],
            "overlap_p": chance["p_enrichment"], "overlap_p_depletion": chance["p_depletion"],
            "energy_share": float(z_energy[in_z].sum() / z_energy.sum()), "energy_chance": m / d}
