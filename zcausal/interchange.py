"""Position-aligned interchange at the last prompt positions (`last:m`), computed only where it can
change anything (the clean run's KV cache serves every earlier position). Used by the layer sweep
and DAS (exp_e_layer_sweep.py, das.py).

A `last:m` patch at layer l replaces, within a subspace, the states of a prompt's last m positions
at l by a source's states (e.g. another prompt's last m positions, aligned from the end). Under
causal attention nothing before those positions changes, at any layer. So:
  1. each prompt's *prefix* (all but its last m tokens) runs once, and its keys and values at every
     layer are kept (encode_prefixes);
  2. its *query block* -- the m suffix positions, then teacher-forced answer tokens -- runs once
     clean through every layer, its states at each layer kept (run_layers with capture);
  3. a patched row starts from the clean query states at layer l, patches the suffix, runs the
     query block alone through layers l+1..L-1 against the clean prefix keys and values, and
     scores its continuations (patched_scores).
A row costs (m + answer tokens) x (L - 1 - l) token-layers instead of (T + answer tokens) x L.

Query block of one prompt: [suffix: m] [segment 0] [segment 1] ... Segment r holds continuation r
(an answer's tokens, all of them, so the distribution after its last token is available too).
Segments are tree-masked: each sees the prefix, the suffix and its own earlier tokens, never
another segment, and each starts at position T; one pass scores several continuations exactly as
separate runs would. Padding at a segment's end is never attended to by a real token.
Rows of a batch may come from different prompts: prefixes are left-padded, rows gather theirs.
A patch may touch only some of the m suffix positions (masked_patch): the others are recomputed
from the next layer on, clean but reading the patched ones (the question set of exp_e's sweep,
zcausal/question.py, patches a question's tokens and recomputes the template's ending).
"""
from dataclasses import dataclass
from types import SimpleNamespace

import torch

import common
from zcausal.conditions import random_seed
from zcausal.decoding import layer_kv


@dataclass
class Prefixes:
    """Clean keys and values of every prompt's prefix, at every layer.

    kv: list over layers of (keys, values), each (U, H_kv, P, d_head), model dtype, on that layer's
    device (one device unless a device map split the model), left-padded to the longest prefix P
    (padded entries are zero); mask: (U, P) long, 1 on real prefix tokens; suffix_ids: (U, m)
    long, each prompt's last m tokens; length: (U,) long, real prompt lengths T (prefix + suffix);
    these three on the model's input device.
    """
    kv: list
    mask: torch.Tensor
    suffix_ids: torch.Tensor
    length: torch.Tensor

    @property
    def m(self):
        return self.suffix_ids.shape[1]


def prompt_ids(tokenizer, texts):
    """Token ids of each text as the model reads it (no special tokens): list of lists."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@torch.no_grad()
def encode_prefixes(model, ids, m, batch_size=16):
    """Run each prompt's prefix (ids[u][:-m]) once and keep its keys and values at every layer.

    ids: list of U token-id lists, each at least m long (an empty prefix is allowed). Returns
    Prefixes: mask, suffix_ids and length on the model's input device (common.input_device), each
    layer's keys and values on that layer's device.
    """
    device = common.input_device(model)
    n_layers = common.num_layers(model)
    if any(len(x) < m for x in ids):
        raise ValueError(f"every prompt needs at least m = {m} tokens")
    width = max(len(x) - m for x in ids)
    kv = [None] * n_layers
    mask = torch.zeros(len(ids), width, dtype=torch.long, device=device)
    order = sorted(range(len(ids)), key=lambda u: len(ids[u]))
    for start in range(0, len(ids), batch_size):
        rows = order[start:start + batch_size]
        local = max(len(ids[u]) - m for u in rows)
        if local == 0:
            continue
        batch = torch.full((len(rows), local), 0, dtype=torch.long)
        local_mask = torch.zeros((len(rows), local), dtype=torch.long)
        for b, u in enumerate(rows):
            n = len(ids[u]) - m
            if n:
                batch[b, local - n:] = torch.tensor(ids[u][:n])
                local_mask[b, local - n:] = 1
        batch, local_mask = batch.to(device), local_mask.to(device)
        cache = common.new_cache(model)
        common.capture_layer_outputs(model, batch, local_mask, [n_layers - 1], cache)
        index = torch.tensor(rows, device=device)
        mask[index, width - local:] = local_mask
        for layer in range(n_layers):
            for slot, tensor in enumerate(layer_kv(cache, layer)):
                if kv[layer] is None:
                    shape = (len(ids), tensor.shape[1], width, tensor.shape[3])
                    kv[layer] = [torch.zeros(shape, dtype=tensor.dtype, device=tensor.device),
                                 torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)]
                # zero the padding: a fully padded row must not carry NaN or junk into attention
                keep = local_mask.bool()[:, None, :, None].to(tensor.device)
                kv[layer][slot][index.to(tensor.device), :, width - local:] = \
                    torch.where(keep, tensor, 0)
    if kv[0] is None:  # every prefix empty
        cfg = model.config
        d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        empty = torch.zeros(len(ids), cfg.num_key_value_heads, 0, d_head,
                            dtype=next(model.parameters()).dtype, device=device)
        kv = [[empty, empty] for _ in range(n_layers)]
    suffix = torch.tensor([x[len(x) - m:] for x in ids], dtype=torch.long, device=device)
    length = torch.tensor([len(x) for x in ids], dtype=torch.long, device=device)
    return Prefixes([tuple(pair) for pair in kv], mask, suffix.reshape(len(ids), m), length)


@dataclass
class QueryBlock:
    """The query block of B rows (see the module docstring), on the prefixes' device.

    rows: (B,) long prompt index of each row; ids, position: (B, Q) long; allowed: (B, Q, Q) bool,
    which query column each query column may attend to; seg_start: list of R ints, the first
    column of each segment; seg_len: (B, R) long, real continuation lengths; targets: list of R
    (B, w_r) long continuation ids (0 past seg_len); m: suffix length.
    """
    rows: torch.Tensor
    ids: torch.Tensor
    position: torch.Tensor
    allowed: torch.Tensor
    seg_start: list
    seg_len: torch.Tensor
    targets: list
    m: int
    prefix_width: int  # the rows' longest real prefix: the prefix columns a pass needs

    @property
    def width(self):
        return self.ids.shape[1]

    def take(self, index):
        """The block of rows `index` (a list or 1-D tensor), same columns."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.ids.device)
        rows = self.rows[index]
        return QueryBlock(rows, self.ids[index], self.position[index], self.allowed[index],
                          self.seg_start, self.seg_len[index], [t[index] for t in self.targets],
                          self.m, self.prefix_width)


def build_block(prefixes, rows, continuations):
    """QueryBlock for prompts `rows` (B ints) with continuations[b] = R non-empty id lists."""
    device = prefixes.mask.device
    m, B = prefixes.m, len(rows)
    n_seg = len(continuations[0])
    widths = [max(len(c[r]) for c in continuations) for r in range(n_seg)]
    starts = [m + sum(widths[:r]) for r in range(n_seg)]
    Q = m + sum(widths)
    ids = torch.zeros(B, Q, dtype=torch.long)
    position = torch.zeros(B, Q, dtype=torch.long)
    allowed = torch.zeros(B, Q, Q, dtype=torch.bool)
    allowed[:, :m, :m] = torch.ones(m, m, dtype=torch.bool).tril()
    seg_len = torch.zeros(B, n_seg, dtype=torch.long)
    targets = [torch.zeros(B, w, dtype=torch.long) for w in widths]
    lengths = prefixes.length.cpu()
    rows_cpu = torch.as_tensor(rows, dtype=torch.long).cpu()
    ids[:, :m] = prefixes.suffix_ids.cpu()[rows_cpu]
    for b, u in enumerate(rows_cpu.tolist()):
        T = int(lengths[u])
        position[b, :m] = torch.arange(T - m, T)
        for r, (start, w) in enumerate(zip(starts, widths)):
            cont = continuations[b][r]
            n = len(cont)
            if n == 0:
                raise ValueError("empty continuation")
            seg_len[b, r] = n
            ids[b, start:start + n] = torch.tensor(cont)
            targets[r][b, :n] = torch.tensor(cont)
            position[b, start:start + w] = T + torch.arange(w)
            allowed[b, start:start + w, :m] = True
            allowed[b, start:start + w, start:start + w] = torch.ones(w, w, dtype=torch.bool).tril()
    prefix_width = int((lengths[rows_cpu] - m).max())
    return QueryBlock(rows_cpu.to(device), ids.to(device), position.to(device),
                      allowed.to(device), starts, seg_len.to(device),
                      [t.to(device) for t in targets], m, prefix_width)


def column_map(block, canonical, segments):
    """(B, Q) long: for each column of `block`, the column of `canonical` (a block of the same
    prompts' continuations, e.g. all of them) holding the same token. block's segment r is
    canonical's segment segments[r]; padding maps to its segment's last real token."""
    B, Q = block.ids.shape
    cols = torch.zeros(B, Q, dtype=torch.long, device=block.ids.device)
    cols[:, :block.m] = torch.arange(block.m, device=cols.device)
    for r, s in enumerate(segments):
        w = block.targets[r].shape[1]
        t = torch.arange(w, device=cols.device)[None].expand(B, w)
        t = torch.minimum(t, block.seg_len[:, r:r + 1] - 1)
        cols[:, block.seg_start[r]:block.seg_start[r] + w] = canonical.seg_start[s] + t
    return cols


def attention_mask(prefixes, block, dtype):
    """Additive mask (B, 1, Q, P_block + Q): 0 where a query column may attend (a real prefix
    token, or an allowed query column), the dtype's min elsewhere."""
    P = prefixes.mask.shape[1]
    prefix = prefixes.mask[block.rows, P - block.prefix_width:].bool()  # (B, P_block)
    Q = block.width
    allowed = torch.cat([prefix[:, None, :].expand(-1, Q, -1), block.allowed], -1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class _PrefixKV:
    """Stands in for a KV cache: hands each layer the rows' clean prefix keys and values in front
    of the query block's own (nothing is stored, so one object serves every layer of a pass)."""

    def __init__(self, prefixes, block):
        self.prefixes, self.rows = prefixes, block.rows
        self.start = prefixes.mask.shape[1] - block.prefix_width  # left padding no row needs

    def update(self, keys, values, layer_idx, *args, **kwargs):
        old_keys, old_values = self.prefixes.kv[layer_idx]
        rows = self.rows.to(old_keys.device)  # under a device map, the layer's own device
        return (torch.cat([old_keys[rows, :, self.start:].to(keys.device), keys], 2),
                torch.cat([old_values[rows, :, self.start:].to(values.device), values], 2))


def run_layers(model, prefixes, block, hidden, start, mask=None, capture=False, stop=None):
    """Run the query block through decoder layers start..stop-1 (stop None: the last layer) from
    `hidden` (B, Q, d), the residual stream entering layer `start` (the output of layer start - 1;
    the embeddings for start = 0). Returns the last layer's output (B, Q, d), and with capture a
    dict layer -> output of every layer run; each on its layer's device (under a device map the
    layers' hooks move their inputs there)."""
    mask = attention_mask(prefixes, block, hidden.dtype) if mask is None else mask
    rotary = model.model.rotary_emb(hidden, block.position)
    cache = _PrefixKV(prefixes, block)
    captured = {}
    for layer in range(start, common.num_layers(model) if stop is None else stop):
        module = common.decoder_layers(model)[layer]
        out = module(hidden, attention_mask=mask, position_ids=block.position,
                     position_embeddings=rotary, use_cache=True,
                     **{common.cache_kwarg(module): cache})
        hidden = out[0] if isinstance(out, tuple) else out
        if capture:
            captured[layer] = hidden
    return (hidden, captured) if capture else hidden


@torch.no_grad()
def block_states(model, prefixes, block, batch_size, languages=None, width=None):
    """The block's clean states at every layer and its clean scores, in batches of rows.

    Returns (hidden (L + 1, B, width, d) in the model's dtype on the block's device, index 0 the
    embeddings and l + 1 the output of layer l, the block's first `width` columns (None: all);
    score()'s dict of the clean run, on the CPU)."""
    n_layers = common.num_layers(model)
    n, width = block.ids.shape[0], block.width if width is None else width
    hidden = torch.empty(n_layers + 1, n, width, common.hidden_size(model),
                         dtype=next(model.parameters()).dtype, device=block.ids.device)
    parts = []
    for start in range(0, n, batch_size):
        index = list(range(start, min(n, start + batch_size)))
        rows = block.take(index)
        emb = embed(model, rows)
        final, captured = run_layers(model, prefixes, rows, emb, 0, capture=True)
        hidden[0, index] = emb[:, :width].to(hidden.device)
        for layer, states in captured.items():  # under a device map, from each layer's device
            hidden[layer + 1, index] = states[:, :width].to(hidden.device)
        parts.append(score(model, final, rows, languages))
    return hidden, {key: torch.cat([p[key] for p in parts]).cpu() for key in parts[0]}


def suffix_attention(model, prefixes, block, layer, entering):
    """Decoder `layer`'s attention at the suffix positions (the patched ones), from the residual
    stream entering it: (B, H, m, P_block + m) float32 over the rows' real prefix keys (clean,
    from the prefix cache) and the suffix keys. entering: (B, Q, d), the block's stream at the
    input of `layer` (only its first m columns are read: later columns are never attended to by
    the suffix). The suffix-only engine's form of zcausal.attention.layer_attention."""
    from zcausal import attention
    m = block.m
    queries, keys = attention.queries_and_keys(model, layer, entering[:, :m],
                                               block.position[:, :m])
    start = prefixes.mask.shape[1] - block.prefix_width
    cached = prefixes.kv[layer][0]  # on the layer's device, like `keys`
    prefix_keys = cached[block.rows.to(cached.device), :, start:].float()
    keys = torch.cat([prefix_keys.to(keys.device), keys], 2)
    real = prefixes.mask[block.rows, start:].bool()  # (B, P_block)
    causal = torch.ones(m, m, dtype=torch.bool, device=real.device).tril()
    allowed = torch.cat([real[:, None, :].expand(-1, m, -1),
                         causal[None].expand(len(real), -1, -1)], -1)
    return attention.attention_probs(queries, keys, allowed)


def embed(model, block):
    """The query block's token embeddings (B, Q, d): the residual stream 'at layer -1'."""
    return common.embeddings(model)(block.ids)


def with_probe(continuation, languages):
    """A continuation (token ids) with the lone-space probe appended when `languages`
    (common.LanguageClasses) has one: score() reads the language margin after it."""
    if languages is None or languages.space_id is None:
        return list(continuation)
    return list(continuation) + [languages.space_id]


def score(model, hidden, block, languages=None):
    """Teacher-forced scores of every segment from the last layer's output `hidden` (B, Q, d).

    Returns dict: logp (B, R) float32, summed log p of each continuation's tokens; logp_first
    (B, R), log p of its first token alone (what the last prompt position predicts); greedy (B, R)
    bool, every token the argmax; top1 (B,) long, the argmax token at the last prompt position
    (the first answer token the run would write). With `languages` (common.LanguageClasses; each
    segment then ends with the probe of with_probe, which is not scored): lang (B, R) float32, the
    language margin after the continuation (common.language_margin: log P(Latin word) - log
    P(Chinese word) next, a lone space marginalised). All on the block's device.
    """
    m = block.m
    probe = int(languages is not None and languages.space_id is not None)
    normed = model.model.norm(hidden[:, m - 1:])
    # (B, Q - m + 1, V): column c predicts token c + 1; from lm_head's device to the block's
    logits = model.lm_head(normed).float().to(block.ids.device)
    logprobs = torch.log_softmax(logits, -1)
    B = hidden.shape[0]
    arange = torch.arange(B, device=logits.device)
    logp, first, greedy, lang = [], [], [], []
    for r, targets in enumerate(block.targets):
        w = targets.shape[1]
        t = torch.arange(w, device=logits.device)[None]
        pred = torch.where(t == 0, 0, block.seg_start[r] - m + t)  # logits column of token t
        n_scored = block.seg_len[:, r:r + 1] - probe
        valid = t < n_scored
        picked = logprobs[arange[:, None], pred, targets]
        logp.append((picked * valid).sum(1))
        first.append(picked[:, 0])
        best = logits[arange[:, None], pred].argmax(-1) == targets
        greedy.append((best | ~valid).all(1))
        if languages is not None:
            after = block.seg_start[r] - m + n_scored[:, 0]  # what follows the continuation
            after_space = logprobs[arange, after + 1] if probe else None
            lang.append(common.language_margin(logprobs[arange, after], after_space, languages))
    out = {"logp": torch.stack(logp, 1), "logp_first": torch.stack(first, 1),
           "greedy": torch.stack(greedy, 1), "top1": logits[:, 0].argmax(-1)}
    if languages is not None:
        out["lang"] = torch.stack(lang, 1)
    return out


def segment_logp(model, hidden, block, segment=0):
    """Summed log p of continuation `segment`'s tokens (B,) float32 from the last layer's output
    `hidden` (B, Q, d): score()'s logp[:, segment] for a block without the language probe, with
    the LM head and its log-softmax computed only at the columns that predict one of those
    tokens. score() computes them at every column from the last suffix position on, the other
    segments', the token after the answer and padding included; over a vocabulary of 150k the
    LM head costs as much per position as about nine decoder layers of the 0.5B, so DAS's loss
    (a few layers above the patch, one answer per row) spends most of its time there."""
    m, targets = block.m, block.targets[segment]
    t = torch.arange(targets.shape[1], device=hidden.device)
    column = torch.where(t == 0, m - 1, block.seg_start[segment] + t - 1)  # predicts token t
    rows, tokens = (t[None] < block.seg_len[:, segment:segment + 1]).nonzero(as_tuple=True)
    logits = model.lm_head(model.model.norm(hidden[rows, column[tokens]])).float()  # (N, V)
    picked = torch.log_softmax(logits, -1).gather(1, targets[rows, tokens][:, None])[:, 0]
    return torch.zeros(len(hidden), dtype=picked.dtype, device=hidden.device).index_add(
        0, rows, picked)


def patch_suffix(hidden, patch, m):
    """The query block's states (B, Q, d) with its first m columns, the suffix, replaced by
    patch(suffix (B, m, d)) -> (B, m, d); the answer columns after them untouched."""
    return torch.cat([patch(hidden[:, :m]).to(hidden.dtype), hidden[:, m:]], 1)


def patched_states(model, prefixes, block, layer, hidden, patch, mask=None):
    """The last layer's output (B, Q, d) of the query block when the suffix's output of decoder
    `layer` (-1: embeddings) is replaced by patch(suffix_states (B, m, d)) -> (B, m, d). hidden:
    the clean query states at that layer (B, Q, d). Differentiable (for DAS) unless called under
    torch.no_grad()."""
    hidden = patch_suffix(hidden, patch, block.m)
    return run_layers(model, prefixes, block, hidden, layer + 1, mask)


def patched_scores(model, prefixes, block, layer, hidden, patch, languages=None, mask=None):
    """score() of the query block patched as patched_states() says."""
    final = patched_states(model, prefixes, block, layer, hidden, patch, mask)
    return score(model, final, block, languages)


def scores_and_readout(model, prefixes, block, layer, hidden, patch, readout_layer,
                       clean_entering, languages=None, mask=None, query_rows=None):
    """patched_scores, and how far the patch moves the attention of decoder `readout_layer` at
    the suffix positions: the block runs from layer + 1 up to readout_layer, whose attention is
    read from the stream entering it (suffix_attention, against clean_entering(), a callable
    giving the clean stream there (B, Q, d), called only when needed), then the remaining layers
    run; the scores equal a single pass's. query_rows (B, m) bool: the suffix positions `all`
    averages over (None: every one). Returns (scores, tv_last (B,), tv_all (B,)): the total
    variation averaged over heads at the last suffix position / over query_rows (CPU float32);
    NaN where the patched stream is not below readout_layer (None: no readout), whose attention
    a patch at or above it cannot reach."""
    from zcausal import attention
    m = block.m
    mask = attention_mask(prefixes, block, hidden.dtype) if mask is None else mask
    hidden = patch_suffix(hidden, patch, m)
    nan = torch.full((len(hidden),), float("nan"))
    if readout_layer is None or layer + 1 > readout_layer:
        final = run_layers(model, prefixes, block, hidden, layer + 1, mask)
        return score(model, final, block, languages), nan, nan
    entering = run_layers(model, prefixes, block, hidden, layer + 1, mask, stop=readout_layer)
    rows = torch.ones(len(hidden), m, dtype=torch.bool) if query_rows is None else query_rows
    shift = attention.row_shift(
        suffix_attention(model, prefixes, block, readout_layer, clean_entering()),
        suffix_attention(model, prefixes, block, readout_layer, entering), rows)
    final = run_layers(model, prefixes, block, entering, readout_layer, mask)
    return score(model, final, block, languages), shift["last"], shift["all"]


def subspace_patch(basis, complement, source):
    """A patch for patched_scores: h <- h + P_S (s - h) on the suffix (common.patch_subspace).
    basis (B, k, d), complement (B,) bool, source (B, m, d)."""
    return lambda suffix: common.patch_subspace(suffix, basis, complement, source)


def masked_patch(patch, positions):
    """`patch` (a patch for patched_scores) applied only at the suffix positions `positions`
    (B, m) bool; every other suffix position comes back bit-identical, and is recomputed from the
    next layer on like any clean position (e.g. a question's tokens patched, the template's
    ending after them not)."""
    def apply(suffix):
        where = positions.to(suffix.device)[..., None]
        return torch.where(where, patch(suffix).to(suffix.dtype), suffix)
    return apply


def make_conditions(d, k, named, n_random, seed, layer=None):
    """Conditions as one table: names, draws (-1 for named ones), bases (C, k, d) float32 and
    complement (C,) bool. named: list of (name, basis (k, d) or None) after none and full;
    layer: None for the draws shared by every layer, else the layer they are drawn for."""
    names, draws, bases = ["none", "full"], [-1, -1], [torch.zeros(k, d), torch.zeros(k, d)]
    for name, basis in named:
        names.append(name)
        draws.append(-1)
        bases.append(basis.float())
    for draw in range(n_random):
        names.append("random")
        draws.append(draw)
        bases.append(common.random_basis(d, k, random_seed(seed, k, draw, layer)))
    complement = torch.tensor([name == "full" for name in names])
    return SimpleNamespace(names=names, draws=draws, bases=torch.stack(bases), complement=complement)
