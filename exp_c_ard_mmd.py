"""Experiment C: ARD-MMD extraction of Z, the coordinates that zh and en versions of a problem share.

    python exp_c_ard_mmd.py --model Qwen/Qwen2.5-3B --objective contrastive plan
    # the committed CPU example (fewer steps at a larger lr: see the README):
    OMP_NUM_THREADS=1 python exp_c_ard_mmd.py --model /work/models/qwen-0.5b \
        --objective contrastive plan --steps 400 --min-steps 200 --lr 0.05 \
        --out results/example-qwen2.5-coder-0.5b/exp_c --figures figures/example-qwen2.5-coder-0.5b

Data. For each pair i, the token states of the bare zh question and of the bare en question (no
template) at each layer: two clouds zh_i (n_i, d) and en_i (m_i, d) of different lengths. The first
token (attention sink) is dropped, and so is any token prefix the two questions share. Coordinates
are standardised per layer with the median and the IQR/1.349 of the pooled tokens of both languages
of the training problems (robust, as NOTES 4 asks: a few coordinates are orders of magnitude larger
than the rest); `--standardise meansd` uses the mean and sd instead.

Kernel. k_l(x, y) = exp(-1/2 sum_j (x_j - y_j)^2 / l_j^2), parameterised by log l. The unbiased
MMD^2_u(zh_i, en_i') = mean_{t!=t'} k(x_t, x_t') + mean_{s!=s'} k(y_s, y_s') - 2 mean_{t,s} k(x_t, y_s).
Clouds are padded to a common length with masks; every pair (and every fit) is one batched tensor op.

Objectives (w_j = 1/l_j^2, D_ii' = MMD^2_u(zh_i, en_i'), N training problems):
  plan (phase3-plan C.3, literal): sum_i D_ii + lambda * sum_j 1/l_j.
    Every l_j -> infinity sends the kernel to 1, each D_ii to 0 and the penalty to 0: "Z is empty"
    is the minimum at every lambda (NOTES 4). Implemented to show that collapse.
  contrastive (default; NOTES 4(a)):
    L(l) = sum_i [ D_ii / tau + log sum_i' exp(-D_ii' / tau) ]     (zh_i must find en_i)
         + sum_i [ D_ii / tau + log sum_i' exp(-D_i'i / tau) ]     (en_i must find zh_i)
         + lambda * sum_j w_j
    Why it cannot collapse: each bracket is a cross-entropy -log softmax(-D/tau), so L >= 0 plus the
    penalty. When the kernel goes constant (all l_j -> infinity, or any l_j -> 0, which zeroes every
    off-diagonal kernel value), every D_ii' -> 0 and L -> 2 N log N, the loss of guessing at chance.
    Near that limit, MMD^2_u ~ sum_j w_j a_j(i, i') with a_j the unbiased squared mean difference of
    coordinate j, so switching on coordinate j alone changes L by
        w_j * [ lambda - (2 / tau) * (sum_{i,i'} a_j(i, i') / N - sum_i a_j(i, i)) ] + O(w_j^2):
    a coordinate whose cross-problem gap exceeds its same-problem cross-lingual gap by more than
    lambda * tau / 2 lowers the loss below chance, so the empty Z is not a minimum whenever the data
    hold one such coordinate. A coordinate that differs by language only adds the same amount to
    every D_ii' (the softmax ignores it) and pays the penalty, so it is switched off.

Z. |Z| = #{j : l_j < l_ref}, with l_ref the cold start's lengthscale (the median pairwise distance
of the layer's standardised training tokens): a coordinate is in Z when the fit weighs it more than
the isotropic kernel does. Not a median split (that gives d/2 by definition). `z_size_rel` in
summary.csv also counts w_j >= 0.1 * max_j w_j.

Starts. warm: log l_j = -log(z_energy_j + eps), z_energy = diag(P_Z) = (V_Z**2).sum(0) from the
SVD mask V_Z (common.z_basis) at --basis-layer (plan C.4); cold: every l_j = l_ref.

Selection and evaluation. Problems are split into train / val / test. Fits use training problems
only; lambda is selected per (layer, objective, start) by val retrieval accuracy (ties: the larger
lambda); test retrieval accuracy (argmin_i' D_ii', mean of both directions, chance 1 / N_test) is
reported for the selected lambda, next to that of the starting kernel.

Speed. Per (layer, objective) all (start, lambda) fits run as one batch; clouds sit on the device
once per layer; the loss comes to the host every 50 steps only. Measured on a shared 2-core CPU
(1 thread, other jobs running): 40 pairs (1039 zh + 1198 en tokens), d=896, 3 lambdas batched:
contrastive 0.33 s/step, plan 0.15 s/step. Not timed on a GPU.

Outputs (--out): summary.csv (one row per fit), lengthscales.npz (log l per fit, z_energy, l_ref),
traces.csv (loss and |Z| over steps), config.json; figures via common.figure_path.
"""
import argparse
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from common import (DEFAULT_CACHE, add_common_args, check_k, check_layer, extract_activations,
                    hidden_size, load_model, load_model_config, num_layers, z_basis)
from problems import add_pairs_args, load_pairs
from runs import (UsageError, figure_path, prepare_out_dir, run_cli, run_config, save_figure,
                  set_seed, write_json)

# Defaults (phase3-plan C.5), in one place.
PLAN_NUM_LAYERS = 36  # Qwen2.5-3B; other depths get the same fractions of depth
PLAN_LAYERS = [10, 15, 20, 25, 28, 30, 32, 33, 34, 35]
PLAN_BASIS_LAYER = 32
K = 50
LAMBDAS = [0.001, 0.01, 0.1]
LR = 0.01
STEPS = 1000           # at most; the plateau check may stop a fit earlier
MIN_STEPS = 500        # no plateau stop before this many steps
PLATEAU_EVERY = 50     # read the loss on the host only this often
PLATEAU_TOL = 1e-3     # relative change of the loss over PLATEAU_EVERY steps
LOG_EVERY = 10
TAU = 0.1
WARM_EPS = 1e-3
REL_THRESHOLD = 0.1    # for z_size_rel
VAL_FRAC = 0.25
TEST_FRAC = 0.25
TRACE_COLUMNS = ["loss", "data", "penalty", "z_size"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, "exp_c")
    add_pairs_args(p)
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="model layer indices (default: the plan's layers at the same depth fractions)")
    p.add_argument("--basis-layer", type=int, default=None,
                   help="layer of the SVD Z mask (default: plan's 32 at the same depth fraction)")
    p.add_argument("--k", type=int, default=K, help="rank of the SVD Z mask")
    p.add_argument("--objective", nargs="+", choices=["contrastive", "plan"],
                   default=["contrastive"])
    p.add_argument("--start", nargs="+", choices=["warm", "cold"], default=["warm", "cold"])
    p.add_argument("--lambdas", type=float, nargs="+", default=LAMBDAS)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--min-steps", type=int, default=MIN_STEPS)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--tau", type=float, default=TAU)
    p.add_argument("--plateau-tol", type=float, default=PLATEAU_TOL)
    p.add_argument("--log-every", type=int, default=LOG_EVERY)
    p.add_argument("--warm-eps", type=float, default=WARM_EPS)
    p.add_argument("--standardise", choices=["robust", "meansd"], default="robust")
    p.add_argument("--keep-first", action="store_true", help="keep the first token")
    p.add_argument("--val-frac", type=float, default=VAL_FRAC)
    p.add_argument("--test-frac", type=float, default=TEST_FRAC)
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="activation cache ('none': off)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Validation (before any weights load or any file is written)

def scale_layer(plan_layer, n_layers):
    """The layer at the same fraction of depth: round(plan_layer / 36 * L), clipped to L - 1."""
    return min(n_layers - 1, int(math.floor(plan_layer / PLAN_NUM_LAYERS * n_layers + 0.5)))


def resolve_layers(args, config):
    n = num_layers(config)
    layers = args.layers if args.layers is not None else [scale_layer(l, n) for l in PLAN_LAYERS]
    for layer in layers:
        check_layer(config, layer)
    basis = args.basis_layer if args.basis_layer is not None else scale_layer(PLAN_BASIS_LAYER, n)
    check_layer(config, basis)
    return sorted(set(layers)), basis


def validate_args(args, config):
    check_k(config, args.k)
    if args.steps < 1 or args.min_steps < 0 or args.log_every < 1:
        raise UsageError("--steps and --log-every must be at least 1 and --min-steps at least 0")
    if args.lr <= 0 or args.tau <= 0 or args.warm_eps <= 0:
        raise UsageError("--lr, --tau and --warm-eps must be positive")
    if any(lam < 0 for lam in args.lambdas):
        raise UsageError("--lambdas must be non-negative")
    if not (0 < args.val_frac < 1 and 0 < args.test_frac < 1 and args.val_frac + args.test_frac < 1):
        raise UsageError("--val-frac and --test-frac must be in (0, 1) and sum to less than 1")


def split_problems(n, val_frac, test_frac, seed):
    """Disjoint index arrays train / val / test over n problems (seeded permutation)."""
    n_test, n_val = max(2, round(test_frac * n)), max(2, round(val_frac * n))
    if n - n_test - n_val < 2:
        raise UsageError(f"{n} pairs are too few for train/val/test splits of at least 2 problems "
                         f"each; use more pairs or smaller --val-frac/--test-frac")
    perm = np.random.default_rng(seed).permutation(n)
    return {"test": np.sort(perm[:n_test]), "val": np.sort(perm[n_test:n_test + n_val]),
            "train": np.sort(perm[n_test + n_val:])}


# ----------------------------------------------------------------------------------------------
# Token clouds

def shared_prefix_len(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def load_clouds(model, tokenizer, pairs, layers, args):
    """Token states of the bare questions: two lists (zh, en) of float32 (T_i, len(layers), d) on
    the CPU, first token and any shared zh/en token prefix dropped. Also returns how many pairs
    had a shared prefix."""
    texts = [p["zh"] for p in pairs] + [p["en"] for p in pairs]
    cache = None if args.cache_dir == "none" else args.cache_dir
    states = extract_activations(model, tokenizer, texts, layers, pool=None,
                                 drop_first=not args.keep_first, batch_size=args.batch_size,
                                 cache_dir=cache, desc="extract zh+en")
    n, zh, en, shared = len(pairs), [], [], 0
    for i, pair in enumerate(pairs):
        ids = [tokenizer(pair[lang], add_special_tokens=False)["input_ids"] for lang in ("zh", "en")]
        extra = shared_prefix_len(*ids) - (0 if args.keep_first else 1)
        shared += extra > 0
        extra = max(extra, 0)
        zh.append(states[i][extra:].float())
        en.append(states[n + i][extra:].float())
        if min(len(zh[-1]), len(en[-1])) < 2:
            raise UsageError(f"pair {pair['id']} has fewer than 2 tokens left in one language; "
                             f"the unbiased MMD needs at least 2")
    return zh, en, int(shared)


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
    data = mmd2_paired(zh, en, torch.exp(-log_l)).sum(1)
    penalty = lambdas * torch.exp(-log_l).sum(1)
    return data + penalty, data, penalty


def contrastive_loss(zh, en, log_l, lambdas, tau=TAU):
    dist = mmd2_matrix(zh, en, torch.exp(-log_l))  # (F, N, N), row: zh_i, column: en_i'
    data = 2 * dist.shape[1] * contrastive_ce(dist, tau)
    penalty = lambdas * torch.exp(-2 * log_l).sum(1)
    return data + penalty, data, penalty


def objective_fn(name, zh, en, tau):
    if name == "plan":
        return lambda log_l, lambdas: plan_loss(zh, en, log_l, lambdas)
    return lambda log_l, lambdas: contrastive_loss(zh, en, log_l, lambdas, tau)


def fit_lengthscales(loss_fn, log_l0, lambdas, log_l_ref, args):
    """Adam on log l for F independent fits at once (Adam is elementwise, so batching them is
    exact). log_l0 (F, d); lambdas (F,). Every PLATEAU_EVERY steps the losses come to the host; a
    fit whose loss moved by less than plateau_tol (relative) since the last check, after
    min_steps, is frozen at that point. Returns final log l (F, d) on the CPU, the trace
    (n_log, F, 4: loss, data, penalty, |Z|) with NaN after a fit stopped, and steps run (F,)."""
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


def compute_z_energy(model, layer, k):
    """diag(P_Z) = (V_Z**2).sum(0) of the SVD mask at `layer`: float32 (d,), sums to k."""
    return (z_basis(model, layer, k) ** 2).sum(0)


def compute_overlap(in_z, z_energy):
    """ARD's Z (bool (d,)) against the SVD mask's top-|Z| coordinates by diag(P_Z).

    overlap: coordinates in both; overlap_expected: |Z|^2 / d, the hypergeometric mean for a random
    selection of |Z| coordinates; overlap_p: P(X >= overlap), X ~ Hypergeom(d, |Z|, |Z|);
    energy_share: sum of diag(P_Z) over Z / k; energy_chance: |Z| / d, its expected value for a
    random selection."""
    from scipy.stats import hypergeom
    in_z, z_energy = np.asarray(in_z, bool), np.asarray(z_energy, float)
    d, m = len(in_z), int(in_z.sum())
    if m == 0:
        return {"overlap": 0, "overlap_expected": 0.0, "overlap_p": 1.0, "energy_share": 0.0,
                "energy_chance": 0.0}
    top = np.argsort(-z_energy, kind="stable")[:m]
    overlap = int(in_z[top].sum())
    return {"overlap": overlap, "overlap_expected": m * m / d,
            "overlap_p": float(hypergeom.sf(overlap - 1, d, m, m)),
            "energy_share": float(z_energy[in_z].sum() / z_energy.sum()), "energy_chance": m / d}


# ----------------------------------------------------------------------------------------------
# The experiment

def prepare_layer(zh, en, li, splits, method, device):
    """Standardise layer li with training-token statistics; returns {split: (zh, en) Clouds},
    l_ref (cold lengthscale) and the standardisation."""
    zh_l, en_l = [c[:, li] for c in zh], [c[:, li] for c in en]
    train = splits["train"]
    centre, scale = compute_standardisation([zh_l[i] for i in train] + [en_l[i] for i in train],
                                            method)
    std = lambda clouds, idx: make_clouds(*pad_clouds([(clouds[i] - centre) / scale for i in idx]),
                                          device=device)
    data = {name: (std(zh_l, idx), std(en_l, idx)) for name, idx in splits.items()}
    l_ref = median_pairwise_distance([(zh_l[i] - centre) / scale for i in train]
                                     + [(en_l[i] - centre) / scale for i in train])
    return data, l_ref, {"scale_min": float(scale.min()), "scale_max": float(scale.max())}


def initial_log_l(start, z_energy, l_ref, eps):
    if start == "warm":
        return -torch.log(z_energy + eps)
    return torch.full_like(z_energy, math.log(l_ref))


def summarise_fit(log_l, log_l_ref, z_energy):
    """|Z| (l < l_ref), z_size_rel (w >= REL_THRESHOLD * max w), spectrum stats and SVD overlap."""
    in_z = (log_l < log_l_ref).numpy()
    w = torch.exp(-2 * log_l)
    log10 = log_l.numpy() / math.log(10)
    row = {"z_size": int(in_z.sum()), "z_size_rel": int((w >= REL_THRESHOLD * w.max()).sum()),
           "log10_l_min": float(log10.min()), "log10_l_median": float(np.median(log10)),
           "log10_l_max": float(log10.max())}
    row.update(compute_overlap(in_z, z_energy.numpy()))
    return row


def compute_layer_fits(data, layer, l_ref, objective, z_energy, args, progress):
    """All (start, lambda) fits of one objective at one layer, batched. Returns summary rows, the
    final log l (F, d), trace rows and the fits' (start, lambda) labels."""
    zh, en = data["train"]
    device = zh.x.device
    fits = [(s, lam) for s in args.start for lam in args.lambdas]
    log_l0 = torch.stack([initial_log_l(s, z_energy, l_ref, args.warm_eps) for s, _ in fits]).to(device)
    lambdas = torch.tensor([lam for _, lam in fits], device=device)
    t0 = time.time()
    loss_fn = objective_fn(objective, zh, en, args.tau)
    final, trace, stopped = fit_lengthscales(loss_fn, log_l0, lambdas, math.log(l_ref), args)
    seconds = time.time() - t0
    with torch.no_grad():
        loss_final = loss_fn(final.to(device), lambdas)[0].cpu().numpy()
    progress.update(len(fits))
    scores = {f"{split}_{when}": evaluate_retrieval(*data[split], ll, args.tau)
              for split in ("val", "test") for when, ll in (("init", log_l0), ("final", final))}
    rows, trace_rows = [], []
    for f, (start, lam) in enumerate(fits):
        row = {"layer": layer, "objective": objective, "start": start, "lambda": lam,
               "l_ref": l_ref, "steps_run": int(stopped[f]), "plateaued": bool(stopped[f] < args.steps),
               "loss_init": float(trace[0, f, 0]), "loss_final": float(loss_final[f]),
               "fit_seconds_batch": seconds}
        row.update(summarise_fit(final[f], math.log(l_ref), z_energy))
        for key, (acc, ce) in scores.items():
            row[f"retrieval_{key}"], row[f"ce_{key}"] = float(acc[f]), float(ce[f])
        row["retrieval_chance_test"] = 1 / len(data["test"][0].x)
        row["ce_chance_test"] = math.log(len(data["test"][0].x))
        rows.append(row)
        for i, values in enumerate(trace[:, f].tolist()):
            if not math.isnan(values[0]):
                trace_rows.append({"layer": layer, "objective": objective, "start": start,
                                   "lambda": lam, "step": i * args.log_every,
                                   **dict(zip(TRACE_COLUMNS, values))})
    return rows, final, trace_rows, fits


def mark_selected(summary):
    """selected = lowest held-out (val) contrastive cross-entropy per (layer, objective, start),
    a continuous score (val retrieval accuracy saturates); ties go to the larger lambda."""
    summary["selected"] = False
    for _, group in summary.groupby(["layer", "objective", "start"]):
        best = group.sort_values(["ce_val_final", "lambda"], ascending=[True, False]).index[0]
        summary.loc[best, "selected"] = True
    return summary


def compute_all(zh, en, layers, splits, z_energy, args, device):
    from tqdm.auto import tqdm
    rows, traces, log_ls, layer_info = [], [], {}, {}
    total = len(layers) * len(args.objective) * len(args.start) * len(args.lambdas)
    with tqdm(total=total, desc="ARD fits (layer, lambda, start)") as progress:
        for li, layer in enumerate(layers):
            data, l_ref, info = prepare_layer(zh, en, li, splits, args.standardise, device)
            layer_info[layer] = {"l_ref": l_ref, **info}
            for objective in args.objective:
                r, final, t, fits = compute_layer_fits(data, layer, l_ref, objective, z_energy,
                                                       args, progress)
                rows += r
                traces += t
                for f, (start, lam) in enumerate(fits):
                    log_ls[(layer, objective, start, lam)] = final[f]
    return rows, traces, log_ls, layer_info


# ----------------------------------------------------------------------------------------------
# Saving

def save_results(out, rows, traces, log_ls, layers, z_energy, layer_info, args):
    import pandas as pd
    summary = mark_selected(pd.DataFrame(rows))
    summary.to_csv(out / "summary.csv", index=False, float_format="%.6g")
    pd.DataFrame(traces).to_csv(out / "traces.csv", index=False, float_format="%.6g")
    shape = (len(layers), len(args.objective), len(args.start), len(args.lambdas), len(z_energy))
    log10_l = np.full(shape, np.nan, dtype=np.float32)
    for (layer, obj, start, lam), ll in log_ls.items():
        log10_l[layers.index(layer), args.objective.index(obj), args.start.index(start),
                args.lambdas.index(lam)] = ll.numpy() / math.log(10)
    np.savez_compressed(out / "lengthscales.npz", log10_l=log10_l, layers=np.array(layers),
                        objectives=np.array(args.objective), starts=np.array(args.start),
                        lambdas=np.array(args.lambdas), z_energy=z_energy.numpy(),
                        log10_l_ref=np.array([math.log10(layer_info[l]["l_ref"]) for l in layers]))
    return summary


# ----------------------------------------------------------------------------------------------
# Plots (only from saved results)

def _style(lam, lambdas):
    import matplotlib.pyplot as plt
    return plt.cm.viridis(0.15 + 0.7 * sorted(lambdas).index(lam) / max(1, len(lambdas) - 1))


def plot_z_size(out, path):
    import matplotlib.pyplot as plt
    import pandas as pd
    s = pd.read_csv(out / "summary.csv")
    d = len(np.load(out / "lengthscales.npz")["z_energy"])
    objectives = list(dict.fromkeys(s["objective"]))
    fig, axes = plt.subplots(1, len(objectives), figsize=(5.5 * len(objectives), 4), squeeze=False)
    for ax, obj in zip(axes[0], objectives):
        for (start, lam), g in s[s.objective == obj].groupby(["start", "lambda"]):
            ax.plot(g["layer"], g["z_size"], "o-" if start == "cold" else "s--",
                    color=_style(lam, list(s["lambda"].unique())), label=f"{start}, λ={lam:g}")
        ax.set_yscale("symlog", linthresh=10)  # keeps |Z| = 0 visible next to |Z| near d
        ax.set(title=f"{obj} objective", xlabel="layer", ylabel=f"|Z| = #{{j: l_j < l_ref}} (d={d})",
               ylim=(0, d))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("ARD-MMD: size of Z by layer")
    save_figure(fig, path)


def plot_spectrum(out, path, basis_layer):
    """Histogram of log10 l and the sorted curve at the basis layer, selected lambda per fit."""
    import matplotlib.pyplot as plt
    import pandas as pd
    s = pd.read_csv(out / "summary.csv")
    npz = np.load(out / "lengthscales.npz")
    layers = list(npz["layers"])
    layer = basis_layer if basis_layer in layers else layers[-1]
    li = layers.index(layer)
    fig, (ax_h, ax_c) = plt.subplots(1, 2, figsize=(11, 4))
    sel = s[(s.layer == layer) & s.selected]
    for _, r in sel.iterrows():
        v = npz["log10_l"][li, list(npz["objectives"]).index(r.objective),
                           list(npz["starts"]).index(r.start), list(npz["lambdas"]).index(r["lambda"])]
        label = f"{r.objective}, {r.start}, λ={r['lambda']:g} (|Z|={r.z_size})"
        ax_h.hist(v, bins=60, histtype="step", label=label)
        ax_c.plot(np.sort(v), label=label)
    for ax in (ax_h, ax_c):
        (ax.axvline if ax is ax_h else ax.axhline)(npz["log10_l_ref"][li], color="k", ls=":",
                                                   label="l_ref (Z threshold)")
        ax.grid(alpha=0.3)
    ax_h.set(xlabel="log10 lengthscale", ylabel="coordinates", title=f"layer {layer}: histogram")
    ax_c.set(xlabel="coordinate rank", ylabel="log10 lengthscale", title=f"layer {layer}: sorted")
    ax_c.legend(fontsize=7)
    save_figure(fig, path)


def plot_overlap(out, path):
    """ARD Z vs the SVD mask's top-|Z| coordinates (count and P_Z energy share) against chance."""
    import matplotlib.pyplot as plt
    import pandas as pd
    s = pd.read_csv(out / "summary.csv")
    s = s[s.selected]
    fig, (ax_o, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    for i, ((obj, start), g) in enumerate(s.groupby(["objective", "start"])):
        color = plt.cm.tab10(i)
        ax_o.plot(g["layer"], g["overlap"] / g["z_size"].clip(lower=1), "o-", color=color,
                  label=f"{obj}, {start}")
        ax_o.plot(g["layer"], g["overlap_expected"] / g["z_size"].clip(lower=1), ":", color=color)
        sig = g[g["overlap_p"] < 0.05]
        ax_o.plot(sig["layer"], sig["overlap"] / sig["z_size"].clip(lower=1), "*", ms=12,
                  color=color)
        ax_e.plot(g["layer"], g["energy_share"], "o-", color=color, label=f"{obj}, {start}")
        ax_e.plot(g["layer"], g["energy_chance"], ":", color=color)
    ax_o.set(xlabel="layer", ylabel="overlap / |Z|", ylim=(-0.02, 1.02),
             title="ARD Z ∩ SVD top-|Z| (dotted: random; ★ hypergeom. p<0.05)")
    ax_e.set(xlabel="layer", ylabel="share of P_Z energy on Z", ylim=(-0.02, 1.02),
             title="diag(P_Z) mass on ARD Z (dotted: random, |Z|/d)")
    for ax in (ax_o, ax_e):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Selected λ per layer; SVD mask at the basis layer (warm start used it: circular)")
    save_figure(fig, path)


def plot_traces(out, path, basis_layer):
    """Loss (relative to its start) and |Z| over steps at the basis layer, every fit."""
    import matplotlib.pyplot as plt
    import pandas as pd
    t = pd.read_csv(out / "traces.csv")
    layer = basis_layer if basis_layer in set(t.layer) else t.layer.max()
    t = t[t.layer == layer]
    objectives = list(dict.fromkeys(t["objective"]))
    fig, axes = plt.subplots(len(objectives), 2, figsize=(11, 3.6 * len(objectives)), squeeze=False)
    lambdas = list(t["lambda"].unique())
    for row, obj in zip(axes, objectives):
        for (start, lam), g in t[t.objective == obj].groupby(["start", "lambda"]):
            style = dict(color=_style(lam, lambdas), ls="-" if start == "cold" else "--",
                         label=f"{start}, λ={lam:g}")
            row[0].plot(g["step"], g["loss"], **style)
            row[1].plot(g["step"], g["z_size"], **style)
        row[0].set(title=f"{obj}: loss (layer {layer})", xlabel="step", ylabel="loss")
        row[1].set(title=f"{obj}: |Z| (layer {layer})", xlabel="step", ylabel="|Z|")
        for ax in row:
            ax.grid(alpha=0.3)
        row[1].legend(fontsize=7)
    save_figure(fig, path)


def plot_all(args, out, basis_layer):
    plot_z_size(out, figure_path(args, "z_size"))
    plot_spectrum(out, figure_path(args, "spectrum"), basis_layer)
    plot_overlap(out, figure_path(args, "overlap"))
    plot_traces(out, figure_path(args, "traces"), basis_layer)


# ----------------------------------------------------------------------------------------------

def main(args):
    config = load_model_config(args.model)
    layers, basis_layer = resolve_layers(args, config)
    validate_args(args, config)
    pairs = load_pairs(args)
    splits = split_problems(len(pairs), args.val_frac, args.test_frac, args.seed)
    out = prepare_out_dir(args.out, args.overwrite)
    set_seed(args.seed)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed)
    device = next(model.parameters()).device
    z_energy = compute_z_energy(model, basis_layer, args.k)
    zh, en, n_shared = load_clouds(model, tokenizer, pairs, layers, args)
    t0 = time.time()
    rows, traces, log_ls, layer_info = compute_all(zh, en, layers, splits, z_energy, args, device)
    fit_seconds = time.time() - t0
    summary = save_results(out, rows, traces, log_ls, layers, z_energy, layer_info, args)
    write_json(out / "config.json", run_config(
        args, model, layers=layers, basis_layer=basis_layer, fit_seconds=fit_seconds,
        fit_device=str(device), pairs_with_shared_prefix=n_shared,
        splits={k: [pairs[i]["id"] for i in v] for k, v in splits.items()},
        layer_info=layer_info, hidden_size=hidden_size(config),
        standardisation=f"{args.standardise} (per layer, pooled zh+en tokens of training problems)",
        z_definition="|Z| = #{j : l_j < l_ref}, l_ref = median pairwise distance of standardised "
                     "training tokens (the cold start); z_size_rel: w_j >= 0.1 max w",
        selection="lambda per (layer, objective, start) by val contrastive cross-entropy "
                  "(tau as fitted); ties: larger lambda"))
    plot_all(args, out, basis_layer)
    sel = summary[summary.selected]
    print(sel[["layer", "objective", "start", "lambda", "z_size", "retrieval_test_init",
               "retrieval_test_final", "overlap", "overlap_expected", "overlap_p"]].to_string())
    print(f"fits took {fit_seconds:.1f} s on {device}; results in {out}")
    return summary


if __name__ == "__main__":
    run_cli(main, parse_args())
