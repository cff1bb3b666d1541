"""The fast engine's decode steps, and the row-finishing bookkeeping both engines share.

decoding.generate_and_score(engine="fast") runs its prompt pass and scores through the Hugging Face
model (the same code as the eager engine), then calls decode() here for the generated tokens:
- a preallocated KV cache, keys and values (2, layers, B, H_kv, T, d_head), filled once from the
  prompt's cache, each step writing its new key and value at slot T_prompt + step;
- one step = Qwen2's decoder stack for one new token per row. The model's own modules do the
  embedding, rotary angles, MLPs, o_proj and lm_head; RMSNorm is transformers' formula through
  torch's fused rms_norm (with the module's weight and eps); attention is written out: q/k/v
  projections with their biases as one matmul (weights concatenated once), RoPE in transformers'
  rotate_half form, grouped-query attention over the cache with the G query heads of a key/value
  head taken as G queries of length 1 (no key repeated), one additive mask per step for all
  layers, scaled by self_attn.scaling, through SDPA's memory-efficient kernel on CUDA;
- the generated-position patch (SubspacePatch with patch_generated) applied inside the step at
  patch.stream, and the greedy token, the stop check and the counters (advance) on the device;
- on CUDA each step shape is captured once as a CUDA graph and replayed (one launch per step,
  no host synchronisation); the host reads "has every row finished?" only every check_every steps.
Checked token for token against the eager loop and the Hugging Face forward in
tests/test_decoding.py (float32, CPU) and tests/test_cuda.py (bfloat16, GPU).
"""
import collections
import contextlib
import math
import warnings
import weakref

import torch
import torch.nn.functional as F

from common import decoder_layers, patch_subspace

USE_CUDA_GRAPHS = True  # False: the same step run op by op on CUDA (for debugging)
MAX_GRAPHS = 16  # captured step shapes kept per model (each holds its own scratch memory)


# ----------------------------------------------------------------------------------------------
# When a row is finished (the same tensor code in both engines)

TABLES = ("stop", "digit", "blank", "only_continuation", "leading_continuation", "deficit")
COUNTERS = ("done", "seen_digit", "after_number", "owed", "length")


def new_stop_state(batch, vocab, device, stop_ids, tables, fill):
    """Per-row finish bookkeeping on the device. Counters (B,): done, seen_digit, after_number
    (bool), owed (continuation bytes the last character still lacks) and length (tokens up to and
    including the one that finished the row), long. Tables (V,): stop (bool) and the answer-end
    traits (problems.TRAITS: digit, blank, only_continuation bool; leading_continuation, deficit
    long) from `tables`, a dict of (V,) tensors (a missing trait is all False / 0; None: all of
    them, so no row stops at its answer's end); fill () long."""
    state = {"stop": torch.zeros(vocab, dtype=torch.bool)}
    state["stop"][[i for i in stop_ids if 0 <= i < vocab]] = True
    for name in TABLES[1:]:
        kind = torch.long if name in ("leading_continuation", "deficit") else torch.bool
        state[name] = torch.zeros(vocab, dtype=kind)
        given = (tables or {}).get(name)
        if given is not None:
            state[name][:min(vocab, len(given))] = given[:vocab].to(kind)
    state = {name: value.to(device) for name, value in state.items()}
    for name in COUNTERS:
        kind = torch.long if name in ("owed", "length") else torch.bool
        state[name] = torch.zeros(batch, dtype=kind, device=device)
    state["fill"] = torch.tensor(fill, dtype=torch.long, device=device)
    return state


def advance(logits, state):
    """The greedy token of each row from logits (B, V), the rows already finished given
    state["fill"]; a row finishes on a stop token, or where its answer ends (problems.answer_end,
    the same rule: after its number has ended, the first token that is not blank and leaves no
    character unfinished; with only a digit table, the first token without a digit after one with
    a digit). Updates state in place with no host synchronisation (it runs inside the CUDA
    graph). Returns the tokens (B,) long."""
    token = torch.where(state["done"], state["fill"], logits.argmax(-1))
    has_digit = state["digit"][token]
    state["after_number"].logical_or_(state["seen_digit"] & ~has_digit)
    state["seen_digit"].logical_or_(has_digit)
    owed = torch.where(state["only_continuation"][token],
                       (state["owed"] - state["leading_continuation"][token]).clamp(min=0),
                       state["deficit"][token])
    state["owed"].copy_(owed)
    finished = state["stop"][token] | (state["after_number"] & ~state["blank"][token] & (owed == 0))
    state["length"].add_((~state["done"]).long())
    state["done"].logical_or_(finished)
    return token


# ----------------------------------------------------------------------------------------------
# The step

def _rotate(x, cos, sin):
    """transformers' apply_rotary_pos_emb for one position: x (B, heads, d_head), cos/sin (B, 1,
    d_head): x cos + rotate_half(x) sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def _rms_norm(norm, x):
    """transformers' Qwen2RMSNorm, weight * (x / rms(x) in float32, cast back), through the fused
    torch.nn.functional.rms_norm where torch has it (4 kernels instead of 8 on a GPU)."""
    if not hasattr(F, "rms_norm") or not hasattr(norm, "variance_epsilon"):
        return norm(x)
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon)
    return norm.weight * normed.to(x.dtype)


def _attention_backends(device):
    """On CUDA, SDPA's memory-efficient kernel (masks, bf16, safe to capture in a graph: the one
    static-cache decoders such as gpt-fast use) or else the math one, not a backend picked by shape;
    elsewhere torch's own choice."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class _Shape:
    """The buffers of one decode shape (B rows, T cache slots, the patch's k and stream), and on
    CUDA its captured graph. Everything the step reads or writes lives here, at fixed addresses."""

    def __init__(self, decoder, kv, B, T, k, stream):
        model = decoder.model
        device, d = kv.device, model.config.hidden_size
        vocab = model.lm_head.out_features
        self.kv, self.k, self.stream = kv, k, stream
        self.tok = torch.zeros(B, dtype=torch.long, device=device)
        self.pos = torch.zeros(B, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.valid = torch.zeros(B, T, dtype=torch.bool, device=device)
        self.state = new_stop_state(B, vocab, device, (), None, 0)
        if k is not None:
            self.basis = torch.zeros(B, k, d, device=device)
            self.complement = torch.zeros(B, dtype=torch.bool, device=device)
            self.source_mean = torch.zeros(B, d, device=device)
            self.generated = torch.zeros(B, dtype=torch.bool, device=device)
        self.graph, self.logits = None, None

    def load(self, cache_kv, attention_mask, position, patch, state):
        """Fill the buffers for a new batch: the prompt's keys and values, the mask, the patch,
        and the finish bookkeeping (the tables and counters of `state`, new_stop_state's)."""
        T_prompt = attention_mask.shape[1]
        for l, (keys, values) in enumerate(cache_kv):
            self.kv[0, l, :, :, :T_prompt].copy_(keys)
            self.kv[1, l, :, :, :T_prompt].copy_(values)
        # Masked slots still enter attention as weight 0 x value: a NaN left there by an earlier
        # batch (or by uninitialised memory) would turn every row's output into NaN.
        self.kv[:, :, :, :, T_prompt:].zero_()
        self.valid.zero_()
        self.valid[:, :T_prompt].copy_(attention_mask.bool())
        self.pos.copy_(position[:, -1] + 1)
        self.slot.fill_(T_prompt)
        for name in TABLES + COUNTERS + ("fill",):
            self.state[name].copy_(state[name])
        if self.k is not None:
            self.basis.copy_(patch.basis)
            self.complement.copy_(patch.complement)
            self.source_mean.copy_(patch.source_mean)
            self.generated.copy_(patch.patch_generated)


class _Decoder:
    """Per model: the fused q/k/v weights, the KV store and the captured shapes."""

    def __init__(self, model):
        config = model.config
        self._model = weakref.ref(model)  # _DECODERS is keyed by the model: no strong reference
        self.H, self.H_kv = config.num_attention_heads, config.num_key_value_heads
        self.d_head = getattr(config, "head_dim", None) or config.hidden_size // self.H
        self.shapes = collections.OrderedDict()
        self.store, self.signature, self.qkv = None, None, None

    @property
    def model(self):
        return self._model()

    def weights(self):
        """[(W_qkv, b_qkv)] per layer, concatenated again whenever a projection changed (moved,
        cast or edited in place: data pointers and version counters are compared)."""
        projections = [(a.q_proj, a.k_proj, a.v_proj) for a in
                       (layer.self_attn for layer in decoder_layers(self.model))]
        signature = tuple((p.weight.data_ptr(), p.weight._version, p.weight.dtype,
                           None if p.bias is None else (p.bias.data_ptr(), p.bias._version))
                          for trio in projections for p in trio)
        if signature != self.signature:
            self.shapes.clear()  # graphs read the old concatenated weights
            self.qkv = [(torch.cat([p.weight for p in trio]),
                         None if trio[0].bias is None else torch.cat([
                             p.bias if p.bias is not None else p.weight.new_zeros(p.out_features)
                             for p in trio])) for trio in projections]
            self.signature = signature
        return self.qkv

    def kv_view(self, B, T, dtype, device):
        """(2, L, B, H_kv, T, d_head) keys and values over one reused store (CUDA graphs keep the
        address); a larger shape reallocates it and drops the graphs captured on the old one."""
        L = len(decoder_layers(self.model))
        n = 2 * L * B * self.H_kv * T * self.d_head
        if device.type != "cuda":
            return torch.empty(2, L, B, self.H_kv, T, self.d_head, dtype=dtype, device=device)
        if self.store is None or self.store.numel() < n or self.store.dtype != dtype or \
                self.store.device != device:
            self.shapes.clear()
            self.store = None
            self.store = torch.empty(n, dtype=dtype, device=device)
        return self.store[:n].view(2, L, B, self.H_kv, T, self.d_head)

    def shape(self, B, T, k, stream, dtype, device, use_graph):
        """The buffers of one decode shape; with use_graph, captured on first use and kept."""
        self.weights()
        key = (B, T, k, stream, dtype, device)
        if use_graph and key in self.shapes:
            self.shapes.move_to_end(key)
            return self.shapes[key]
        shape = _Shape(self, self.kv_view(B, T, dtype, device), B, T, k, stream)
        if use_graph:
            try:
                self._capture(shape)
            except RuntimeError as err:  # a kernel that cannot be captured: still correct, slower
                warnings.warn(f"CUDA graph capture failed ({err}); this decode shape runs op by op")
                torch.cuda.synchronize()
                shape.graph = None
            self.shapes[key] = shape
            while len(self.shapes) > MAX_GRAPHS:
                self.shapes.popitem(last=False)
        return shape

    def _capture(self, shape):
        """Record one step as a CUDA graph. The warm-up step runs on a side stream first (library
        handles and workspaces are made outside the capture); its writes are overwritten by load."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step(shape)
        torch.cuda.current_stream().wait_stream(side)
        shape.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(shape.graph):
            shape.logits = self.step(shape)

    def _patch(self, hidden, shape):
        """SubspacePatch's generated-position branch on the shape's buffers (no host check)."""
        patched = patch_subspace(hidden, shape.basis, shape.complement, shape.source_mean[:, None])
        return torch.where(shape.generated[:, None, None], patched, hidden)

    def step(self, shape):
        """One token per row: reads shape.tok at shape.pos, writes its key and value at
        shape.slot, leaves the next token in shape.tok (advance), returns the logits (B, V)."""
        model = self.model.model
        hidden = model.embed_tokens(shape.tok)[:, None]  # (B, 1, d)
        if shape.stream == -1:
            hidden = self._patch(hidden, shape)
        cos, sin = model.rotary_emb(hidden, shape.pos[:, None])  # (B, 1, d_head)
        shape.valid.index_fill_(1, shape.slot, True)
        # One additive mask per step for every layer (a bool mask is converted again per call).
        mask = torch.zeros(shape.valid.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill_(~shape.valid, torch.finfo(hidden.dtype).min)[:, None, None, :]
        with _attention_backends(hidden.device):
            hidden = self._layers(shape, hidden, cos, sin, mask)
        logits = self.model.lm_head(_rms_norm(model.norm, hidden))[:, 0]
        shape.tok.copy_(advance(logits, shape.state))
        shape.pos.add_(1)
        shape.slot.add_(1)
        return logits

    def _layers(self, shape, hidden, cos, sin, mask):
        """The decoder layers for one new token per row: hidden (B, 1, d) in, (B, 1, d) out."""
        qkv, B, H, H_kv, d_head = self.qkv, shape.tok.shape[0], self.H, self.H_kv, self.d_head
        for l, layer in enumerate(decoder_layers(self.model)):
            attn = layer.self_attn
            x = F.linear(_rms_norm(layer.input_layernorm, hidden), *qkv[l])
            x = x.view(B, H + 2 * H_kv, d_head)
            qk = _rotate(x[:, :H + H_kv], cos, sin)
            keys, values = shape.kv[0, l], shape.kv[1, l]
            keys.index_copy_(2, shape.slot, qk[:, H:, None])
            values.index_copy_(2, shape.slot, x[:, H + H_kv:, None])
            out = F.scaled_dot_product_attention(qk[:, :H].reshape(B, H_kv, H // H_kv, d_head),
                                                 keys, values, attn_mask=mask, scale=attn.scaling)
            hidden = hidden + attn.o_proj(out.reshape(B, 1, H * d_head))
            hidden = hidden + layer.mlp(_rms_norm(layer.post_attention_layernorm, hidden))
            if l == shape.stream:
                hidden = self._patch(hidden, shape)
        return hidden


_DECODERS = weakref.WeakKeyDictionary()


def _decoder(model):
    if model not in _DECODERS:
        _DECODERS[model] = _Decoder(model)
    return _DECODERS[model]


def _cache_kv(cache):
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers < 4.54


def decode(model, cache, first_logits, attention_mask, position, max_new_tokens, patch, stop_ids,
           tables, fill, return_logits, check_every):
    """Greedy tokens after a prompt pass: cache, the prompt's DynamicCache; first_logits (B, V), the
    last prompt position's logits; attention_mask and position (B, T_prompt) of the prompt.
    Returns (tokens: list of (B,) per generated token, logits: list of (B, V) float32 or None,
    state: advance's bookkeeping, steps: decode forwards run). Stops once every row has finished,
    read every check_every steps."""
    B, T_prompt = attention_mask.shape
    device, dtype = first_logits.device, next(model.parameters()).dtype
    vocab = first_logits.shape[-1]
    state = new_stop_state(B, vocab, device, stop_ids, tables, fill)
    if max_new_tokens == 0:  # scores only
        return [], [] if return_logits else None, state, 0
    tokens, logits_seen = [advance(first_logits, state)], [first_logits] if return_logits else None
    if max_new_tokens == 1:
        return tokens, logits_seen, state, 0
    use_graph = device.type == "cuda" and USE_CUDA_GRAPHS
    T = T_prompt + max_new_tokens - 1
    if device.type == "cuda":  # few distinct shapes, so few graphs; aligned rows for attention
        T = 64 * math.ceil(T / 64)
    patched = patch is not None and bool(patch.patch_generated.any())
    k, stream = (patch.basis.shape[1], patch.stream) if patched else (None, None)
    shape = _decoder(model).shape(B, T, k, stream, dtype, device, use_graph)
    shape.load(_cache_kv(cache), attention_mask, position, patch, state)
    shape.tok.copy_(tokens[0])
    can_stop = bool(stop_ids) or tables is not None
    steps = 0
    for i in range(1, max_new_tokens):
        if can_stop and (i - 1) % check_every == 0 and bool(shape.state["done"].all()):
            break
        if shape.graph is not None:
            shape.graph.replay()
            logits = shape.logits
        else:
            logits = _decoder(model).step(shape)
        steps += 1
        tokens.append(shape.tok.clone())
        if return_logits:
            logits_seen.append(logits.to(torch.float32, copy=True))
    state = {name: value.clone() for name, value in shape.state.items()}
    return tokens, logits_seen, state, steps
