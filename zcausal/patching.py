"""Experiment A's patch machinery: one layer's states, sources and bases (LayerContext), and the
SubspacePatch of a batch of jobs (make_patch). exp_a_patching.py builds its jobs and tables on top.

A job (exp_a_patching.Job) names a problem, a layer, a condition, k, positions, a source and the
source problem; make_patch turns a batch of them into one common.SubspacePatch whose rows gather
their bases and sources from device_tables (on the model's device) in a few indexed copies.
"""
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

import common
from zcausal import attention, decoding, problems, stats, transport
from zcausal.conditions import random_seed

RANDOM_CONDITIONS = ["rand_z", "rand_zperp"]
COMPLEMENT = {"zperp", "full", "rand_zperp", "noop"}  # P_S = I - V^T V (noop, full: V = 0)


def last_positions(source):
    """m for a last / last:m source, else None."""
    return (int(source.split(":")[1]) if ":" in source else 1) if source.startswith("last") else None


# ----------------------------------------------------------------------------------------------
# One layer's states, sources and bases

@torch.no_grad()
def capture_prompt_states(model, tokenizer, texts, spans, stream, batch_size):
    """Unpatched states at residual stream `stream` (-1: embeddings) for each prompt: (list of
    (T_i, d) float32 CPU tensors over real tokens, (N, d) float32 means over the question span)."""
    device = common.input_device(model)
    tokens, means = [None] * len(texts), [None] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(texts), batch_size):
        rows = order[start:start + batch_size]
        ids, mask, span_mask = common.tokenize_left_padded(
            tokenizer, [texts[i] for i in rows], [spans[i] for i in rows], device=device)
        hidden = common.capture_layer_outputs(model, ids, mask, [stream])[stream]
        pooled = common.mean_pool(hidden, span_mask)
        for b, i in enumerate(rows):
            tokens[i] = hidden[b][mask[b].bool()].float().cpu()
            means[i] = pooled[b].cpu()
    return tokens, torch.stack(means)


def prompt_texts(pairs, template, lang):
    """Templated prompts and the character span of each question inside them."""
    filled = [problems.format_prompt(template[lang], p[lang]) for p in pairs]
    return [t for t, _ in filled], [s for _, s in filled]


def make_bases(model, layer, ks, n_draws, seed, fold_norm=False, kind="uniform", cov_sqrt=None):
    """Z of `layer` and the random bases: dict ("z", k, -1) / ("rand", k, draw) -> float32 (k, d).
    kind "matched" draws with the activations' covariance (needs cov_sqrt, see stats)."""
    d = common.hidden_size(model)
    bases = {}
    for k in ks:
        bases[("z", k, -1)] = common.z_basis(model, layer, k, fold_norm=fold_norm)
        for draw in range(n_draws):
            if kind == "matched":
                v = stats.matched_random_basis(cov_sqrt, k, random_seed(seed, k, draw))
                bases[("rand", k, draw)] = torch.from_numpy(v).float()
            else:
                bases[("rand", k, draw)] = common.random_basis(d, k, random_seed(seed, k, draw))
    return bases


@dataclass
class LayerContext:
    """What every batch of one layer needs: the layer, the residual stream patched (the layer's
    output, or its input with --site input), the English prefill at that stream, the question
    means of both languages (N, d), the token states (lists of (T_i, d)), bases and OT sources."""
    layer: int
    stream: int
    prefill: dict
    en_means: torch.Tensor
    en_tokens: list
    zh_means: torch.Tensor
    zh_tokens: list
    bases: dict
    ot_sources: dict
    cov: np.ndarray
    languages: common.LanguageClasses = None  # the vocabulary by script, for the language margin
    device: dict = None  # the same sources and bases on the model's device (device_tables)


def device_tables(ctx, device):
    """What make_patch gathers from, on the model's device, so that a batch's patch is built
    there in a few indexed copies instead of on the host and copied over each batch: means (2N, d)
    (Chinese, then English question means), per k a (bases, k, d) stack of Z and the random draws
    with the row of each basis key, the Chinese prompts' token states and the OT sources."""
    stacks = {}
    for k in sorted({k for _, k, _ in ctx.bases}):
        keys = sorted(key for key in ctx.bases if key[1] == k)
        stacks[k] = (torch.stack([ctx.bases[key] for key in keys]).to(device),
                     {key: row for row, key in enumerate(keys)})
    return dict(means=torch.cat([ctx.zh_means, ctx.en_means]).float().to(device), stacks=stacks,
                zh_tokens=[t.to(device) for t in ctx.zh_tokens],
                ot=({key: v.float().to(device) for key, v in ctx.ot_sources.items()}))


def prepare_layer(model, tokenizer, pairs, template, layer, args, swap_of, languages=None):
    """States, sources and bases of one layer (see LayerContext); the English prompts run through
    layers 0..stream once (decoding.shared_prefill)."""
    stream = layer if args.site == "output" else layer - 1
    tqdm.write(f"layer {layer}: English prompts through layers 0..{stream} (shared prefill), "
               f"Chinese prompt states")
    en_texts, en_spans = prompt_texts(pairs, template, "en")
    ids, mask, span_mask = common.tokenize_left_padded(tokenizer, en_texts, en_spans)
    prefill = decoding.shared_prefill(model, ids, mask, stream)
    real = prefill["attention_mask"].bool()
    en_tokens = [prefill["hidden"][i][real[i]].float().cpu() for i in range(len(pairs))]
    en_means = common.mean_pool(prefill["hidden"], span_mask).cpu()
    zh_texts, zh_spans = prompt_texts(pairs, template, "zh")
    zh_tokens, zh_means = capture_prompt_states(model, tokenizer, zh_texts, zh_spans, stream,
                                                args.batch_size)
    # Position 0 (the sink) is left out of the covariance, whose norm would dominate it; at most
    # 32768 tokens (seeded) keep it cheap for MGSM-sized runs.
    states = torch.cat([t[1:] for t in en_tokens + zh_tokens])
    keep = torch.randperm(len(states), generator=torch.Generator().manual_seed(0))[:32768]
    cov = stats.covariance(states[keep.sort().values].numpy())
    draws = max(args.n_random, args.n_random_logprob)
    tqdm.write(f"layer {layer}: Z and {draws} {args.random_kind} random bases per k")
    bases = make_bases(model, layer, args.k, draws, args.seed, args.fold_norm, args.random_kind,
                       stats.covariance_sqrt(cov) if args.random_kind == "matched" else None)
    ot_sources = {}
    if "ot" in args.source:
        scale = transport.robust_scale(en_tokens + zh_tokens)
        for i in range(len(pairs)):
            for j in (i, swap_of[i]):
                ot_sources[(i, j)] = transport.ot_source(en_tokens[i], zh_tokens[j], scale)[0]
    ctx = LayerContext(layer, stream, prefill, en_means, en_tokens, zh_means, zh_tokens, bases,
                       ot_sources, cov, languages or common.LanguageClasses(tokenizer))
    ctx.device = device_tables(ctx, prefill["hidden"].device)
    return ctx


def variance_rows(ctx, args):
    """Share of the layer's activation variance in Z and in both kinds of random subspace (the
    uniform draws of the run's seeds, and variance-matched draws), one dict per basis."""
    d = ctx.cov.shape[0]
    cov_sqrt = stats.covariance_sqrt(ctx.cov)
    out = []
    for k in args.k:
        share = lambda v: stats.variance_share(np.asarray(v, np.float64), ctx.cov)  # noqa: E731
        out.append(dict(layer=ctx.layer, k=k, basis="z", draw=-1,
                        share=share(ctx.bases[("z", k, -1)])))
        for draw in range(max(args.n_random, 1)):
            seed = random_seed(args.seed, k, draw)
            out.append(dict(layer=ctx.layer, k=k, basis="uniform", draw=draw,
                            share=share(common.random_basis(d, k, seed))))
            out.append(dict(layer=ctx.layer, k=k, basis="matched", draw=draw,
                            share=share(stats.matched_random_basis(cov_sqrt, k, seed))))
    return out


# ----------------------------------------------------------------------------------------------
# Patches

def make_patch(batch, ctx, rows, args):
    """A SubspacePatch for a batch of Jobs, built on the device of rows["hidden"] from
    ctx.device. rows: decoding.select_prefill of the batch's problems (prompts left-padded to a
    common width T; rows["hidden"] (B, T, d) are their own states)."""
    tables, hidden = ctx.device, rows["hidden"]
    device = hidden.device
    mask = rows["attention_mask"].bool().to(device)
    B, T = mask.shape
    n, d = ctx.zh_means.shape
    subspace = [b for b, j in enumerate(batch) if j.condition not in ("none", "noop", "full")]
    basis = torch.zeros(B, max([1] + [batch[b].k for b in subspace]), d, device=device)
    for k in sorted({batch[b].k for b in subspace}):
        at = [b for b in subspace if batch[b].k == k]
        stack, row = tables["stacks"][k]
        basis[at, :k] = stack[[row[("rand", k, batch[b].draw) if batch[b].condition in
                                    RANDOM_CONDITIONS else ("z", k, -1)] for b in at]]
    flags = lambda values: torch.tensor(values, device=device)  # noqa: E731
    complement = flags([j.condition in COMPLEMENT for j in batch])
    patch_generated = flags([j.positions == "all" and j.condition not in ("none", "noop")
                             for j in batch])
    source_mean = tables["means"][[n + j.problem if j.condition == "en" else j.source_problem
                                   for j in batch]]
    # last:m rows patch only their last m positions; --skip-first leaves each row's first real
    # token (the attention sink) alone
    first = flags([T - last_positions(j.source) if last_positions(j.source) and j.condition not in
                   ("none", "noop") else 0 for j in batch])
    prompt_mask = mask & (torch.arange(T, device=device)[None] >= first[:, None])
    if args.skip_first:
        prompt_mask[torch.arange(B, device=device), mask.float().argmax(1)] = False
    return common.SubspacePatch(layer=ctx.layer, basis=basis, complement=complement,
                                source_mean=source_mean, patch_generated=patch_generated,
                                source_tokens=source_tokens(batch, tables, hidden, source_mean),
                                prompt_mask=prompt_mask, site=args.site)


def source_tokens(batch, tables, hidden, source_mean):
    """(B, T, d) per-position sources on hidden's device, or None when every row's source is its
    mean: a row's own states (noop), its OT source or its last m Chinese states right-aligned,
    else its mean at every position."""
    per_token = [b for b, j in enumerate(batch) if j.condition == "noop" or (
        j.condition not in ("none", "en") and j.source != "mean")]
    if not per_token:
        return None
    B, T, d = hidden.shape
    tokens = source_mean[:, None, :].expand(B, T, d).clone()
    for b in per_token:
        job = batch[b]
        if job.condition == "noop":
            tokens[b] = hidden[b].float()
        elif job.source == "ot":
            ot = tables["ot"][(job.problem, job.source_problem)]
            tokens[b, T - len(ot):] = ot
        else:
            m = last_positions(job.source)
            tokens[b, T - m:] = tables["zh_tokens"][job.source_problem][-m:]
    return tokens


def patch_sizes(patch, hidden, attention_mask, patched=None):
    """Mean over the patched real prompt positions of |P_S (s - h)|: (B,) float32 on the CPU.
    patched: patch(hidden) when the caller already has it."""
    patch.phase = "prompt"
    moved = patch(hidden) if patched is None else patched
    moved = (moved.float() - hidden.float()).norm(dim=-1) if moved is not None else \
        torch.zeros(hidden.shape[:2], device=hidden.device)
    where = attention_mask.bool().to(hidden.device)
    if patch.prompt_mask is not None:  # None: every prompt position is patched
        where = where & patch.prompt_mask.to(hidden.device)
    return ((moved * where).sum(1) / where.sum(1).clamp(min=1)).cpu()


def attention_read_layer(model, stream):
    """The decoder layer that reads residual stream `stream` first (stream + 1): with --site input
    the basis layer itself, whose kernels Z is built from; None past the last layer."""
    return stream + 1 if stream + 1 < common.num_layers(model) else None


def patch_readouts(model, patch, hidden, attention_mask, read_layer):
    """What a batch's prompt patch does before any later layer runs: patch_size (patch_sizes) and
    the total variation it causes in the attention of decoder `read_layer` (the layer reading the
    patched stream; zcausal.attention.attention_shift), at the last prompt position (attn_tv_last)
    and over every prompt position (attn_tv_all), averaged over heads. hidden: the rows' clean
    states at the patched stream (B, T, d). Returns dict of (B,) float32 CPU tensors (NaN
    attention shifts when no layer reads the stream)."""
    patch.phase = "prompt"
    patched = patch(hidden)
    patched = hidden if patched is None else patched
    out = {"patch_size": patch_sizes(patch, hidden, attention_mask, patched)}
    if read_layer is None:
        nan = torch.full((hidden.shape[0],), float("nan"))
        return dict(out, attn_tv_last=nan, attn_tv_all=nan)
    shift = attention.attention_shift(model, read_layer, hidden, patched, attention_mask)
    return dict(out, attn_tv_last=shift["last"], attn_tv_all=shift["all"])
