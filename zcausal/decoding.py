"""Decoding and teacher-forced scoring under a SubspacePatch: greedy decoding of left-padded
batches, the shared prefill (layers below the patch run once per prompt), and log-probabilities of
given continuations. Imports common (model accessors, hooks, patching).

Two engines sit behind generate_and_score (`engine=`, `--decode` on the command line):
  eager  the plain loop through the Hugging Face model: a growing DynamicCache, the patch as a
         forward hook, a host check of finished rows every step. The reference, for debugging.
  fast   the prompt pass and the scores are eager's own code; the decode steps run Qwen2's decoder
         layer written out for one new token per row (fast_decode.py) over a preallocated KV cache,
         with the generated-position patch and the stop bookkeeping inside the step; on CUDA each
         step shape is captured once as a CUDA graph and replayed, and finished rows are read on
         the host only every CHECK_EVERY steps.
  auto   fast on CUDA; on a CPU, CPU_ENGINE (fast: measured no slower there, see CPU_ENGINE).
A model split across devices by a device map (--device-map) decodes with eager whichever is asked,
with a one-line note: the fast step reads every layer's weights from one device.
Both return the same tokens and scores (float32 on a CPU: tests/test_decoding.py).
"""
import copy
import dataclasses
import sys
import warnings
from contextlib import contextmanager

import torch

import common
from zcausal import fast_decode, problems
from common import (TINY_MODEL, cache_kwarg, new_cache, capture_layer_outputs, decoder_layers,
                    layer_output_hook, num_layers, position_ids_from_mask, tiny_tokenizer)
from zcausal.fast_decode import advance, new_stop_state
from zcausal.runs import UsageError

ENGINES = ("auto", "eager", "fast")
# Measured on this project's 2-core CPU (README, Performance; one thread, the two step
# kinds alternated from the same state): the fast step took 1/1.8 to 1/2.5 of the eager step's
# time on the tiny model (batch 8 and 64) and the same time on Qwen2.5-Coder-0.5B (batch 8 and 32,
# where the matrix products dominate). bench.py --parts step prints both for any machine.
CPU_ENGINE = "fast"
CHECK_EVERY = 4  # fast engine: read "every row finished?" on the host only every this many steps


# ----------------------------------------------------------------------------------------------
# The prompt pass and the scores (shared by both engines)

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
                **{cache_kwarg(model): cache})
    return out.logits.float()


def _score(model, cache, first_logits, attention_mask, position, continuations, patch,
           languages=None):
    """Teacher-forced scores of continuations (B lists of ids) after a prefilled cache; their
    positions count as generated positions for the patch. Returns (logp (B,), summed log-probs;
    first (B,), log p of each continuation's first token; margin (B,) or None). With `languages`
    (common.LanguageClasses) the lone-space probe is fed after each continuation (not scored) and
    margin is the language margin after it (common.language_margin, as interchange.score)."""
    device = first_logits.device
    probe = [] if languages is None or languages.space_id is None else [languages.space_id]
    width = max(len(c) for c in continuations) + len(probe)
    cont = torch.zeros((len(continuations), width), dtype=torch.long)
    n = torch.tensor([len(c) for c in continuations])
    for row, c in enumerate(continuations):
        cont[row, :len(c) + len(probe)] = torch.tensor(list(c) + probe, dtype=torch.long)
    cont, n = cont.to(device), n.to(device)
    fed = cont if languages is not None else cont[:, :-1]  # the margin reads past the answer
    logits = first_logits
    if fed.shape[1]:  # right-padded continuations: padding comes after, so causal attention ignores it
        mask = torch.cat([attention_mask, torch.ones_like(fed)], 1)
        steps = position[:, -1:] + 1 + torch.arange(fed.shape[1], device=device)
        rest = _forward(model, fed, mask, steps, cache, patch, "generate", False)
        logits = torch.cat([first_logits, rest], 1)  # column j predicts continuation token j
    logprobs = torch.log_softmax(logits, -1)
    picked = logprobs[:, :width].gather(-1, cont[..., None])[..., 0]
    logp = (picked * (torch.arange(width, device=device)[None] < n[:, None])).sum(1)
    margin = None
    if languages is not None:
        rows = torch.arange(len(n), device=device)
        after_space = logprobs[rows, n + 1] if probe else None
        margin = common.language_margin(logprobs[rows, n], after_space, languages).cpu()
    return logp.cpu(), picked[:, 0].cpu(), margin


def layer_kv(cache, layer):
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
    (U, T, d), the output of `layer`, and kv, a list over layers 0..layer of (keys, values), each
    on its layer's device.
    """
    device = common.input_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    cache = new_cache(model)
    hidden = capture_layer_outputs(model, input_ids, attention_mask, [layer], cache)[layer]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "layer": layer,
            "hidden": hidden, "kv": [layer_kv(cache, l) for l in range(layer + 1)]}


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
    run. Returns the last position's logits (B, 1, V) float32 on the prompt's device, like
    _forward(..., last_only)."""
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
                    use_cache=True, **{cache_kwarg(block): cache})
        hidden = out[0] if isinstance(out, tuple) else out
    logits = model.lm_head(model.model.norm(hidden[:, -1:])).float()
    return logits.to(prefill["attention_mask"].device)  # under a device map: from the last device


def _prompt_pass(model, input_ids, attention_mask, position, patch, score, prefill, languages):
    """The prompt forward (patched, phase "prompt") and the teacher-forced scores; languages: per
    score set, common.LanguageClasses (read the language margin after it) or None. Returns
    (DynamicCache of the prompt, last-position logits (B, V) float32, list of _score's triples)."""
    cache = new_cache(model)
    if prefill is None:
        logits = _forward(model, input_ids, attention_mask, position, cache, patch, "prompt", True)
    else:  # same result, without recomputing the layers below the patch
        logits = _forward_from_prefill(model, prefill, cache, patch)
    scores = [_score(model, copy.deepcopy(cache), logits, attention_mask, position, continuations,
                     patch, classes) for continuations, classes in zip(score, languages)]
    return cache, logits[:, -1], scores


def _scored(result, scores, logits):
    """The score fields of a batch's result: scores, first_scores, margins (lists, one (B,)
    float32 per continuation set; margins only with languages) and top1 (B,) long, the argmax at
    the last prompt position (the first token greedy decoding writes)."""
    result["scores"] = [logp for logp, _, _ in scores]
    result["first_scores"] = [first for _, first, _ in scores]
    if any(margin is not None for _, _, margin in scores):
        result["margins"] = [torch.full_like(logp, float("nan")) if margin is None else margin
                             for logp, _, margin in scores]
    result["top1"] = logits.argmax(-1).cpu()
    return result


# ----------------------------------------------------------------------------------------------
# When a row is finished (the same tensor code in both engines)

_DIGIT_TABLES = {}


def digit_token_mask(tokenizer, size=None):
    """(size,) bool on the CPU: True for the token ids whose text (each decoded alone) holds a
    digit, the same test as problems' reading of a direct answer. size: the model's vocabulary
    (its logits' width; default len(tokenizer)); ids past the tokenizer's are False."""
    return answer_end_tables(tokenizer, size)["digit"]


def answer_end_tables(tokenizer, size=None):
    """problems.answer_end_tables as (V,) CPU tensors: what stop_when_number_ends reads."""
    key = (id(tokenizer), size)
    if key not in _DIGIT_TABLES:
        tables = {name: torch.from_numpy(value)
                  for name, value in problems.answer_end_tables(tokenizer, size).items()}
        _DIGIT_TABLES[key] = (tokenizer, tables)  # the tokenizer kept: ids stay unique
    return _DIGIT_TABLES[key][1]


def _tokenizer_of(model):
    """The tokenizer that goes with `model`, for the digit table when none was passed: one set on
    the model as `tokenizer_for_decoding`, the in-process tiny one, or the local files of the
    model's folder or hub id (common.load_model's name_or_path_for_results); None if none."""
    tokenizer = getattr(model, "tokenizer_for_decoding", None)
    name = getattr(model, "name_or_path_for_results", None)
    if tokenizer is not None or name is None:
        return tokenizer
    if name == TINY_MODEL:
        return _cached_tokenizer(name, tiny_tokenizer)
    try:
        from transformers import AutoTokenizer
        return _cached_tokenizer(name, lambda: AutoTokenizer.from_pretrained(
            str(name), local_files_only=True))
    except (OSError, ValueError):
        return None


_TOKENIZERS = {}


def _cached_tokenizer(name, make):
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = make()
    return _TOKENIZERS[name]


def _fill_id(model, stop_ids):
    """The token written after a row has finished: its first stop id, else the model's EOS."""
    if stop_ids:
        return min(stop_ids)
    eos = getattr(model.config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return int(eos) if eos is not None else 0


def _end_tables(model, stop_when_number_ends, digits, vocab):
    """The answer-end tables for stop_when_number_ends (answer_end_tables), or None (no stop at
    the answer's end). digits: a tokenizer, a dict of (V,) trait tensors (problems.TRAITS), or a
    (V,) bool tensor of digit tokens alone (a row then finishes at the first token without a digit
    after one with a digit); None: the model's own
    tokenizer (_tokenizer_of); where none can be found the rows run on with a warning (readers
    that cut at the answer's end read the same answers, only later)."""
    if not stop_when_number_ends:
        return None
    if isinstance(digits, torch.Tensor):
        return {"digit": digits.bool().cpu()}
    if isinstance(digits, dict):
        return {name: value.cpu() for name, value in digits.items()}
    tokenizer = digits if digits is not None else _tokenizer_of(model)
    if tokenizer is None:
        warnings.warn("stop_when_number_ends: no tokenizer known for this model, so rows do not "
                      "stop where their answer ends; pass digits=tokenizer", stacklevel=3)
        return None
    return answer_end_tables(tokenizer, vocab)


# ----------------------------------------------------------------------------------------------
# The engines

def fast_unsupported(model):
    """Why the fast engine cannot run this model (a sentence), or None when it can: it writes out
    Qwen2's decoder layer (full attention, RoPE without dynamic rescaling)."""
    config = model.config
    if getattr(config, "model_type", None) not in ("qwen2",):
        return f"it implements Qwen2 only, not {getattr(config, 'model_type', type(model).__name__)}"
    if "sliding_attention" in (getattr(config, "layer_types", None) or []) or \
            getattr(config, "use_sliding_window", False):
        return "this model uses sliding-window attention"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if "dynamic" in kind or kind == "longrope":
        return f"its RoPE ({kind}) rescales with the sequence length"
    return None


def resolve_engine(engine, model):
    """"eager" or "fast" for `engine` in ENGINES on this model's device (see the module docstring)."""
    if engine not in ENGINES:
        raise UsageError(f"--decode {engine}: unknown decode engine; pass one of {', '.join(ENGINES)}")
    why_not = fast_unsupported(model)
    if engine == "auto":
        on_cuda = common.input_device(model).type == "cuda"
        engine = "eager" if why_not else ("fast" if on_cuda else CPU_ENGINE)
    if engine == "fast" and why_not:
        raise UsageError(f"--decode fast: {why_not}; pass --decode eager")
    if engine == "fast" and common.device_split(model):
        _note_split(model)
        return "eager"
    return engine


def _note_split(model):
    """Say once per model why a split model decodes with the eager loop: the fast step reads every
    layer's weights from one device, and a device map leaves them on several (or offloaded)."""
    if not getattr(model, "split_decode_noted", False):
        print("note: the model is split across devices (--device-map), which the fast decode "
              "engine cannot run; decoding with the eager loop", file=sys.stderr, flush=True)
        model.split_decode_noted = True


def _finish(tokens, logits_seen, state, max_new_tokens, fill, steps):
    """The result dict of one batch: tokens (B, max_new_tokens) long on the CPU, filled after
    each row's end; logits (B, max_new_tokens, V) float32 (zeros after the end) when recorded."""
    B = state["done"].shape[0]
    out = torch.full((B, max_new_tokens), fill, dtype=torch.long)
    if tokens:
        out[:, :len(tokens)] = torch.stack(tokens, 1).cpu()
    length = state["length"].cpu()
    result = {"tokens": out, "lengths": length, "steps": steps}
    if logits_seen is not None:
        vocab = logits_seen[0].shape[-1] if logits_seen else 0
        logits = torch.zeros((B, max_new_tokens, vocab), dtype=torch.float32)
        if logits_seen:
            logits[:, :len(logits_seen)] = torch.stack(logits_seen, 1).cpu()
        logits[torch.arange(max_new_tokens)[None] >= length[:, None]] = 0
        result["logits"] = logits
    return result


def _eager_batch(model, input_ids, attention_mask, max_new_tokens, patch, score, return_logits,
                 prefill, stop_ids, tables, languages):
    """Today's loop: the Hugging Face model with a DynamicCache, the patch as a forward hook, and
    a host check of finished rows every step."""
    position = position_ids_from_mask(attention_mask)
    fill = _fill_id(model, stop_ids)
    with _maybe_patch(model, patch):
        cache, logits, scores = _prompt_pass(model, input_ids, attention_mask, position, patch,
                                             score, prefill, languages)
        first = logits
        state = new_stop_state(len(input_ids), logits.shape[-1], logits.device, stop_ids, tables,
                               fill)
        can_stop = bool(stop_ids) or tables is not None
        tokens, logits_seen, steps = [], [] if return_logits else None, 0
        for step in range(max_new_tokens):
            if step:
                if can_stop and bool(state["done"].all()):
                    break
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(tokens[-1]), 1)], 1)
                position = position[:, -1:] + 1
                logits = _forward(model, tokens[-1][:, None], attention_mask, position, cache,
                                  patch, "generate", True)[:, -1]
                steps += 1
            tokens.append(advance(logits, state))
            if return_logits:
                logits_seen.append(logits)
    return _scored(_finish(tokens, logits_seen, state, max_new_tokens, fill, steps), scores, first)


def _fast_batch(model, input_ids, attention_mask, max_new_tokens, patch, score, return_logits,
                prefill, stop_ids, tables, languages):
    """The prompt pass and scores as eager; the decode steps on fast_decode's static KV cache."""
    position = position_ids_from_mask(attention_mask)
    fill = _fill_id(model, stop_ids)
    with _maybe_patch(model, patch):
        cache, logits, scores = _prompt_pass(model, input_ids, attention_mask, position, patch,
                                             score, prefill, languages)
    tokens, logits_seen, state, steps = fast_decode.decode(
        model, cache, logits, attention_mask, position, max_new_tokens, patch, stop_ids, tables,
        fill, return_logits, CHECK_EVERY)
    del cache
    return _scored(_finish(tokens, logits_seen, state, max_new_tokens, fill, steps), scores, logits)


# ----------------------------------------------------------------------------------------------
# The entry point

def _select_patch(patch, rows, width):
    """The patch of rows `rows` of a batch whose prompts are cut to their last `width` columns."""
    if patch is None:
        return None
    cut = {name: (value[rows][:, -width:] if value is not None else None)
           for name, value in (("source_tokens", patch.source_tokens),
                               ("prompt_mask", patch.prompt_mask))}
    return dataclasses.replace(patch, basis=patch.basis[rows], complement=patch.complement[rows],
                               source_mean=patch.source_mean[rows],
                               patch_generated=patch.patch_generated[rows], **cut)


def _batches(attention_mask, batch_size):
    """Row indices in batches of at most batch_size, sorted by prompt length (stable), so that each
    batch pads only to its own longest prompt."""
    length = attention_mask.sum(1).tolist()
    order = sorted(range(len(length)), key=lambda r: length[r])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def generate_and_score(model, input_ids, attention_mask, max_new_tokens, patch=None, stop_ids=(),
                       score=(), return_logits=False, prefill=None, *, engine="auto",
                       stop_when_number_ends=False, digits=None, batch_size=None,
                       languages=None, margin_sets=None):
    """Greedy decoding of a left-padded batch with a KV cache, under an optional SubspacePatch,
    plus teacher-forced scores of continuations from the same prefill.

    score: a list of continuation sets, each B lists of token ids (e.g. the reference answer).
    Returns dict: tokens (B, max_new_tokens) long on the CPU; once a row has finished (a token of
    stop_ids, or with stop_when_number_ends where its answer ends: problems.answer_end, the number
    and the first character after it) its later tokens are the fill id (its first stop id, else the
    model's EOS), so cutting at the first stop token gives the row's text; lengths (B,) long, the
    tokens up to and including the one that finished the row (max_new_tokens if it never did);
    scores and first_scores, one (B,) float32 tensor per set: summed log-probs, and log p of the
    first token alone; with `languages` (common.LanguageClasses) margins, one (B,) float32 per set:
    the language margin after the continuation (common.language_margin, a lone-space probe fed
    after it and not scored), on the sets margin_sets names (None: every set; NaN on the others,
    which then cost no extra token); top1 (B,) long, the argmax at the last prompt position; steps, the
    decode forwards run (most over the batches); logits (B, max_new_tokens, V) float32 with
    return_logits (zeros after a row's end). The batch stops early when every row has finished.
    prefill: optional select_prefill(...) of these very prompts (input_ids and attention_mask must
    be its own); the patch, if any, must then be at stream prefill["layer"] (patch.stream).
    engine: "auto", "eager" or "fast" (module docstring); digits: with stop_when_number_ends, the
    tokenizer, or a (V,) bool tensor marking the token ids with a digit alone (digit_token_mask:
    the row then ends at the first token without a digit after its number); None: the model's own
    tokenizer (_tokenizer_of).
    batch_size: decode at most this many rows at once, the rows sorted by prompt length into
    batches (less padding); results come back in the caller's order. None: one batch.
    """
    engine = resolve_engine(engine, model)
    device = common.input_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if patch is not None:
        patch = patch.to(device)
    stop_ids = sorted(set(int(i) for i in stop_ids))
    tables = _end_tables(model, stop_when_number_ends, digits, model.lm_head.out_features)
    if languages is not None:
        languages = languages.to(device)
    languages = [languages if margin_sets is None or i in margin_sets else None
                 for i in range(len(score))]
    run = _fast_batch if engine == "fast" else _eager_batch
    B = input_ids.shape[0]
    if batch_size is None or B <= batch_size:
        return run(model, input_ids, attention_mask, max_new_tokens, patch, score, return_logits,
                   prefill, stop_ids, tables, languages)
    parts = []
    for rows in _batches(attention_mask, batch_size):
        index = torch.tensor(rows, device=device)
        width = int(attention_mask[index].sum(1).max())
        sub_prefill = select_prefill(prefill, index) if prefill is not None else None
        ids, mask = ((sub_prefill["input_ids"], sub_prefill["attention_mask"]) if sub_prefill
                     else (input_ids[index, -width:], attention_mask[index, -width:]))
        parts.append((rows, run(model, ids, mask, max_new_tokens, _select_patch(patch, index, width),
                                [[c[r] for r in rows] for c in score], return_logits, sub_prefill,
                                stop_ids, tables, languages)))
    return _merge(parts, B)


def _merge(parts, B):
    """One result dict in the caller's row order from [(rows, result of those rows)]."""
    merged = {"steps": max(part["steps"] for _, part in parts)}
    for name in ("tokens", "lengths", "logits", "top1"):
        if name in parts[0][1]:
            first = parts[0][1][name]
            merged[name] = first.new_zeros((B,) + tuple(first.shape[1:]))
            for rows, part in parts:
                merged[name][rows] = part[name]
    for name in ("scores", "first_scores", "margins"):
        if name not in parts[0][1]:
            continue
        merged[name] = []
        for s in range(len(parts[0][1][name])):
            values = torch.zeros(B, dtype=torch.float32)
            for rows, part in parts:
                values[rows] = part[name][s]
            merged[name].append(values)
    return merged


def add_decode_args(parser, aliases=()):
    """--decode, for every script that decodes or teacher-forces (and bench.py, which also accepts
    its old spelling --engine: `aliases`)."""
    parser.add_argument("--decode", *aliases, dest="decode", choices=ENGINES, default="auto",
                        help="decode loop: fast (preallocated KV cache, the patch inside the step, "
                             "CUDA graphs on a GPU), eager (the plain loop through the Hugging Face "
                             "model, for debugging; same tokens in float32), auto (fast on CUDA; "
                             f"on a CPU {CPU_ENGINE}, measured no slower there)")
    return parser


def greedy_generate(model, input_ids, attention_mask, max_new_tokens, patch=None, stop_ids=(),
                    **options):
    """Greedy tokens (B, max_new_tokens) of a left-padded batch; see generate_and_score."""
    return generate_and_score(model, input_ids, attention_mask, max_new_tokens, patch,
                              stop_ids, **options)["tokens"]


def continuation_logprob(model, input_ids, attention_mask, continuations, patch=None, **options):
    """Teacher-forced log p(continuation | prompt) (B,) float32, summed over its tokens."""
    return generate_and_score(model, input_ids, attention_mask, 0, patch,
                              score=[continuations], **options)["scores"][0]
