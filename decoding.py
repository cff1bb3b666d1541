"""Decoding and teacher-forced scoring under a SubspacePatch: greedy decoding of left-padded
batches with a KV cache, the shared prefill (layers below the patch run once per prompt), and
log-probabilities of given continuations. Imports common (model accessors, hooks, patching).
"""
from contextlib import contextmanager

import torch

from common import (_cache_kwarg, _new_cache, capture_layer_outputs, decoder_layers,
                    layer_output_hook, num_layers, position_ids_from_mask)


@contextmanager
def _maybe_patch(model, patch):
    if patch is None:
        yield
    else:
        with layer_output_hook(model, patch.stream, patch):
            yield


def _forward(model, input_ids, attention_mask, position_ids, cache, patch, phase, last_only):
    if patch is not None:
        patch.phase = phase
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1 if last_only else 0,
                **{_cache_kwarg(model): cache})
    return out.logits.float()


def _score(model, cache, first_logits, attention_mask, position, continuations, patch):
    """Summed log-probs (B,) of continuations (B lists of ids) after a prefilled cache, teacher
    forced; continuation positions count as generated positions for the patch."""
    device = first_logits.device
    width = max(len(c) for c in continuations)
    cont = torch.zeros((len(continuations), width), dtype=torch.long)
    cont_mask = torch.zeros_like(cont, dtype=torch.bool)
    for row, c in enumerate(continuations):
        cont[row, :len(c)] = torch.tensor(c, dtype=torch.long)
        cont_mask[row, :len(c)] = True
    cont, cont_mask = cont.to(device), cont_mask.to(device)
    logits = first_logits
    if width > 1:  # right-padded continuations: padding comes after, so causal attention ignores it
        mask = torch.cat([attention_mask, torch.ones_like(cont[:, :-1])], 1)
        steps = position[:, -1:] + 1 + torch.arange(width - 1, device=device)
        rest = _forward(model, cont[:, :-1], mask, steps, cache, patch, "generate", False)
        logits = torch.cat([first_logits, rest], 1)
    logp = torch.log_softmax(logits, -1).gather(-1, cont[..., None])[..., 0]
    return (logp * cont_mask).sum(1).cpu()


def _layer_kv(cache, layer):
    """(keys, values) of one layer of a DynamicCache: (B, H_kv, T, d_head) each."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]  # transformers < 4.54


@torch.no_grad()
def shared_prefill(model, input_ids, attention_mask, layer):
    """Run prompts through layers 0..layer once, for reuse by every row that patches `layer`.

    Every patched row of the same prompt has identical states up to and including `layer`'s
    output, so computing them once per prompt and not once per row removes (layer + 1) / L of the
    prefill. Returns a dict: input_ids, attention_mask (U, T) on the model's device, hidden
    (U, T, d), the output of `layer`, and kv, a list over layers 0..layer of (keys, values).
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    cache = _new_cache(model)
    hidden = capture_layer_outputs(model, input_ids, attention_mask, [layer], cache)[layer]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "layer": layer,
            "hidden": hidden, "kv": [_layer_kv(cache, l) for l in range(layer + 1)]}


def select_prefill(prefill, rows):
    """The prefill of prompts `rows` (B indices, repeats allowed), cut to their longest prompt."""
    rows = torch.as_tensor(rows, device=prefill["input_ids"].device)
    mask = prefill["attention_mask"][rows]
    width = int(mask.sum(1).max())
    return {"input_ids": prefill["input_ids"][rows, -width:], "attention_mask": mask[:, -width:],
            "layer": prefill["layer"], "hidden": prefill["hidden"][rows, -width:],
            "kv": [(k[rows, :, -width:], v[rows, :, -width:]) for k, v in prefill["kv"]]}


def _additive_causal_mask(attention_mask, dtype):
    """(B, 1, T, T) float mask, 0 where a query may attend (causal and not padding), else -inf-ish;
    accepted by both the eager and the sdpa attention of Qwen2 layers."""
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _forward_from_prefill(model, prefill, cache, patch):
    """The prompt forward of a row batch that starts from a selected prefill: the cached layers
    0..layer are copied into `cache`, `layer`'s output is patched, and only the layers above it
    run. Returns the last position's logits (B, 1, V) float32, like _forward(..., last_only)."""
    layer, hidden = prefill["layer"], prefill["hidden"]
    for l, (keys, values) in enumerate(prefill["kv"]):
        cache.update(keys, values, l)
    if patch is not None:
        patch.phase = "prompt"
        patched = patch(hidden)
        hidden = hidden if patched is None else patched
    position = position_ids_from_mask(prefill["attention_mask"])
    mask = _additive_causal_mask(prefill["attention_mask"], hidden.dtype)
    rotary = model.model.rotary_emb(hidden, position)
    for l in range(layer + 1, num_layers(model)):
        block = decoder_layers(model)[l]
        out = block(hidden, attention_mask=mask, position_ids=position, position_embeddings=rotary,
                    use_cache=True, **{_cache_kwarg(block): cache})
        hidden = out[0] if isinstance(out, tuple) else out
    return model.lm_head(model.model.norm(hidden[:, -1:])).float()


@torch.no_grad()
def generate_and_score(model, input_ids, attention_mask, max_new_tokens, patch=None, stop_ids=(),
                       score=(), return_logits=False, prefill=None):
    """Greedy decoding of a left-padded batch with a KV cache, under an optional SubspacePatch,
    plus teacher-forced scores of continuations from the same prefill.

    score: a list of continuation sets, each B lists of token ids (e.g. the reference answer).
    Returns dict: tokens (B, max_new_tokens) long on the CPU (rows keep going after a stop token;
    callers cut at the first one); scores, one (B,) float32 tensor of summed log-probs per set;
    logits (B, max_new_tokens, V) float32 with return_logits.
    prefill: optional select_prefill(...) of these very prompts (input_ids and attention_mask must
    be its own); the patch, if any, must then be at stream prefill["layer"] (patch.stream).
    """
    import copy
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position = position_ids_from_mask(attention_mask)
    cache = _new_cache(model)
    tokens, logits_seen, scores = [], [], []
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    with _maybe_patch(model, patch):
        if prefill is None:
            logits = _forward(model, input_ids, attention_mask, position, cache, patch, "prompt", True)
        else:  # same result, without recomputing the layers below the patch
            logits = _forward_from_prefill(model, prefill, cache, patch)
        for continuations in score:
            scores.append(_score(model, copy.deepcopy(cache), logits, attention_mask, position,
                                 continuations, patch))
        logits = logits[:, -1]
        for _ in range(max_new_tokens):
            next_token = logits.argmax(-1)
            tokens.append(next_token)
            if return_logits:
                logits_seen.append(logits)
            done |= torch.isin(next_token, stop)
            if len(tokens) == max_new_tokens or (len(stop) and bool(done.all())):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(done), 1)], 1)
            position = position[:, -1:] + 1
            logits = _forward(model, next_token[:, None], attention_mask, position, cache, patch,
                              "generate", True)[:, -1]
    out = torch.stack(tokens, 1).cpu() if tokens else torch.zeros(len(done), 0, dtype=torch.long)
    if 0 < len(tokens) < max_new_tokens:  # every row stopped early: pad with its last token
        out = torch.cat([out, out[:, -1:].expand(-1, max_new_tokens - len(tokens))], 1)
    result = {"tokens": out, "scores": scores}
    if return_logits:
        result["logits"] = torch.stack(logits_seen, 1).cpu()
    return result


def greedy_generate(model, input_ids, attention_mask, max_new_tokens, patch=None, stop_ids=()):
    """Greedy tokens (B, max_new_tokens) of a left-padded batch; see generate_and_score."""
    return generate_and_score(model, input_ids, attention_mask, max_new_tokens, patch,
                              stop_ids)["tokens"]


def continuation_logprob(model, input_ids, attention_mask, continuations, patch=None):
    """Teacher-forced log p(continuation | prompt) (B,) float32, summed over its tokens."""
    return generate_and_score(model, input_ids, attention_mask, 0, patch,
                              score=[continuations])["scores"][0]
