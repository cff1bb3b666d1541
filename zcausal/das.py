"""Distributed alignment search (DAS): learn a k-dimensional subspace of one layer's residual stream
by interchange training, the upper bound a k-dimensional Z is judged against.

The intervention is pyvene's LowRankRotatedSpaceIntervention written out: an orthonormal (k, d)
basis V kept orthonormal by torch.nn.utils.parametrizations.orthogonal (what pyvene uses inside),
and h <- h + V^T V (s - h) at the patched positions. It runs inside interchange.py's suffix-only
engine (only the last positions and the answer tokens, only the layers above), which pyvene's
IntervenableModel cannot do: it reruns the whole base prompt every step (see the README's Experiment E section).

    learned = LearnedSubspace(d, k, seed)
    basis, history = train_subspace(learned, loss_fn, val_fn, steps, lr, eval_every)

loss_fn(basis) -> scalar tensor on a fresh training batch; val_fn(basis) -> float (lower is
better), evaluated every eval_every steps; the basis with the best validation value is returned.
For the language model, interchange_loss() is the loss: minus the log-probability of the source
problem's answer under the patch, on swap pairs.
"""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

import common
from zcausal import interchange, problems


class LearnedSubspace(torch.nn.Module):
    """A k-dimensional subspace of R^d as an orthonormal (k, d) basis, trainable.

    Starts at a random (Haar) subspace drawn with `seed`, never at Z: a learned subspace found
    near Z must have got there from the data. The parametrization also draws a random base from
    torch's global generator (the start is the same, the path of training is not); it is drawn
    under `seed` too, so a resumed run trains each subspace exactly as an uninterrupted one.
    """

    def __init__(self, d, k, seed=0):
        super().__init__()
        self.map = torch.nn.Linear(d, k, bias=False)
        with torch.no_grad():
            self.map.weight.copy_(common.random_basis(d, k, seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            torch.nn.utils.parametrizations.orthogonal(self.map)

    def basis(self):
        """(k, d) float32 with orthonormal rows (differentiable)."""
        return self.map.weight


def train_subspace(learned, loss_fn, val_fn, steps, lr=1e-2, eval_every=20, log=None):
    """Adam on the subspace; the basis with the lowest val_fn over evaluations at steps 0,
    eval_every, ..., steps is kept (the choice of steps is made on validation data only).

    Returns (basis (k, d) float32 detached on the CPU, history: list of dicts step, train_loss
    (mean since the last evaluation), val).
    """
    optimiser = torch.optim.Adam(learned.parameters(), lr=lr)
    history, best, best_val, running = [], None, np.inf, []
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                basis = learned.basis().detach().clone()
                val = float(val_fn(basis))
            history.append({"step": step, "train_loss": float(np.mean(running)) if running
                            else np.nan, "val": val})
            running = []
            if log is not None:
                log(history[-1])
            if val < best_val:
                best, best_val = basis.cpu(), val
        if step == steps:
            break
        optimiser.zero_grad()
        loss = loss_fn(learned.basis())
        loss.backward()
        optimiser.step()
        running.append(float(loss.detach()))
    return best, history


def progress_line(k, entry, layer=None):
    """One readable line of DAS training for an entry of train_subspace's history: 'DAS k = 20,
    step 0: validation loss 3.21' (no training loss before the first step), later 'DAS k = 20,
    step 20: training loss 2.95 (mean since the last evaluation), validation loss 2.80'; with
    `layer`, 'DAS at layer 20, k = 20, ...'."""
    train = entry.get("train_loss")
    trained = "" if train is None or np.isnan(train) else \
        f"training loss {train:.3g} (mean since the last evaluation), "
    at = "" if layer is None else f" at layer {layer},"
    return f"DAS{at} k = {k}, step {entry['step']}: {trained}validation loss {entry['val']:.3g}"


def principal_angles(a, b):
    """Principal angles in degrees, ascending, between the row spaces of a (k1, d) and b (k2, d)."""
    from scipy.linalg import subspace_angles
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.sort(np.degrees(subspace_angles(a.T, b.T)))


def overlap(a, b):
    """||P_a P_b||_F^2 / k for orthonormal (k, d) bases: 1 for the same subspace, k / d on average
    for independent random ones."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a @ b.T).pow(2).sum() / min(len(a), len(b)))


def interchange_loss(model, prefixes, block, hidden, sources, layer, basis, segment=0):
    """Mean over rows of minus the summed log p of continuation `segment` (the source problem's
    answer), with the suffix at `layer` patched within span(basis) from `sources`.

    block/hidden: query block rows and their clean states at `layer` (B, Q, d); sources: (B, m, d)
    the source prompts' last m states at `layer`; basis: (k, d), differentiable.
    """
    B = hidden.shape[0]
    patch = interchange.subspace_patch(basis[None].expand(B, -1, -1),
                                       torch.zeros(B, dtype=torch.bool, device=hidden.device),
                                       sources)
    final = interchange.patched_states(model, prefixes, block, layer, hidden, patch)
    return -interchange.segment_logp(model, final, block, segment).mean()


# ----------------------------------------------------------------------------------------------
# DAS on the language model, over exp_e_layer_sweep.prepare()'s state

def das_rows(state, index, split, n_partners, rng):
    """Interchange pairs (i, j) for DAS: each problem i of `index` with its swap partner and
    n_partners - 1 more partners drawn from its own split, answers different from i's."""
    rows = []
    for i in index:
        pool = [j for j, s in enumerate(split) if s == split[i] and j != i and j != state.partner[i]
                and not problems.answers_equal(state.pairs[j]["answer"], state.pairs[i]["answer"])]
        extra = rng.choice(pool, size=min(len(pool), n_partners - 1), replace=False) if pool else []
        rows += [(i, state.partner[i])] + [(i, int(j)) for j in extra]
    return rows


@torch.no_grad()
def das_data(model, state, rows, layer, batch_size):
    """Query blocks [suffix of i][answer of j] for rows (i, j), their clean states at `layer`
    (R, Q, d) and the sources' last m states at `layer` (R, m, d)."""
    block = interchange.build_block(state.prefixes, [i for i, _ in rows],
                                    [[state.answers[j]] for _, j in rows])
    parts = []
    for start in range(0, len(rows), batch_size):
        sub = block.take(list(range(start, min(len(rows), start + batch_size))))
        hidden = interchange.embed(model, sub)
        if layer >= 0:
            hidden = interchange.run_layers(model, state.prefixes, sub, hidden, 0, stop=layer + 1)
        parts.append(hidden)
    sources = state.zh_last[layer + 1][torch.tensor([j for _, j in rows])]
    return SimpleNamespace(block=block, hidden=torch.cat(parts), sources=sources)


def training_data(model, state, layer, split, args):
    """DAS's interchange data at `layer`, the same for every k (so built once per layer): train
    rows (das_rows with --das-partners) and validation rows (swap partners only), each das_data.
    Seeded by args.seed alone."""
    rng = np.random.default_rng(args.seed)
    index = {s: [i for i, name in enumerate(split) if name == s] for s in ("train", "validation")}
    train = das_data(model, state, das_rows(state, index["train"], split, args.das_partners, rng),
                     layer, args.batch_size)
    val = das_data(model, state, das_rows(state, index["validation"], split, 1, rng), layer,
                   args.batch_size)
    return SimpleNamespace(train=train, val=val, layer=layer)


def train_das(model, state, data, k, args, log=None):
    """A k-dim subspace at data.layer learned on its train rows (training_data), the steps
    chosen by the validation loss. Returns (basis (k, d), history frame)."""
    train, val, layer = data.train, data.val, data.layer
    gen = torch.Generator().manual_seed(args.seed)

    def loss_fn(basis):
        pick = torch.randint(len(train.hidden), (args.das_batch,), generator=gen).tolist()
        return interchange_loss(model, state.prefixes, train.block.take(pick),
                                train.hidden[pick], train.sources[pick], layer,
                                basis.to(train.hidden.device))

    def val_fn(basis):
        losses = []
        for start in range(0, len(val.hidden), args.batch_size):
            pick = list(range(start, min(len(val.hidden), start + args.batch_size)))
            losses.append(float(interchange_loss(
                model, state.prefixes, val.block.take(pick), val.hidden[pick], val.sources[pick],
                layer, basis.to(val.hidden.device))) * len(pick))
        return sum(losses) / len(val.hidden)

    learned = LearnedSubspace(common.hidden_size(model), k, seed=args.seed).to(
        state.hidden.device)
    with torch.enable_grad():
        basis, history = train_subspace(learned, loss_fn, val_fn, args.das_steps,
                                        args.das_lr, args.das_eval_every, log)
    return basis, pd.DataFrame(history)


def das_angles(basis, named, random_bases, k):
    """Principal angles of the DAS subspace (k, d) to each named basis and to each random draw
    of the same k: min, median and max angle, mean_cos2 (the mean cos² of the angles, i.e.
    overlap()) and its chance value k / d (the expectation for a random subspace)."""
    rows = []
    for name, draw, other in named + [("random", d, b) for d, b in enumerate(random_bases)]:
        angles = principal_angles(basis, other)
        rows.append(dict(k=k, versus=name, draw=draw, min_angle=angles.min(),
                         median_angle=float(np.median(angles)), max_angle=angles.max(),
                         mean_cos2=overlap(basis, other), chance_mean_cos2=k / basis.shape[1]))
    return pd.DataFrame(rows)
