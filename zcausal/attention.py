"""The attention of one decoder layer, computed from its input: Z's own positive control.

Z is built from layer b's query-key kernels, so a patch of Z at the *input* of layer b has one
effect it cannot fail to have if it writes anything there: it moves layer b's attention. The
readout here recomputes that one layer's attention probabilities from the residual stream entering
it (its RMSNorm, q_proj and k_proj with their biases, RoPE, grouped-query heads, the causal and
padding mask), for the clean and the patched stream, and compares them row by row:

    probs = layer_attention(model, b, hidden, attention_mask)          # (B, H, T, T) float32
    shift = attention_shift(model, b, clean, patched, attention_mask)  # dict of (B,) tensors

The rest of the model keeps its fast attention; only this layer's probabilities are formed, in
float32, for the rows that need them. tests/test_attention.py checks them against Hugging Face's
eager attention (output_attentions=True).
"""
import torch

import common


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _heads(states, n_heads):
    """(B, T, n_heads * d_head) -> (B, n_heads, T, d_head)."""
    B, T, _ = states.shape
    return states.view(B, T, n_heads, -1).transpose(1, 2)


def queries_and_keys(model, layer, hidden, position_ids):
    """Layer `layer`'s queries (B, H, T, d_head) and keys (B, H_kv, T, d_head), float32, RoPE
    applied, from the residual stream entering it: hidden (B, T, d) at position_ids (B, T). On the
    layer's device (under a device map its hooks move `hidden` there)."""
    module = common.decoder_layers(model)[layer]
    attn, config = module.self_attn, model.config
    normed = module.input_layernorm(hidden.to(module.input_layernorm.weight.dtype))
    q = _heads(attn.q_proj(normed).float(), config.num_attention_heads)
    k = _heads(attn.k_proj(normed).float(), config.num_key_value_heads)
    cos, sin = model.model.rotary_emb(hidden, position_ids)
    cos, sin = cos.float()[:, None].to(q.device), sin.float()[:, None].to(q.device)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def attention_probs(queries, keys, allowed):
    """softmax(q k^T / sqrt(d_head)) over the allowed keys, grouped-query heads expanded:
    queries (B, H, Q, d_head), keys (B, H_kv, K, d_head), allowed (B, Q, K) bool -> (B, H, Q, K)
    float32, on the queries' device. A query row with no allowed key (padding) comes back all
    zeros."""
    group = queries.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    scores = queries @ keys.transpose(-1, -2) * queries.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed.to(scores.device)[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def causal_allowed(attention_mask):
    """(B, T, T) bool from a left-padded (B, T) mask: query t may read key s <= t when both are
    real tokens."""
    real = attention_mask.bool()
    T = real.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=real.device).tril()
    return causal[None] & real[:, None, :] & real[:, :, None]


@torch.no_grad()
def layer_attention(model, layer, hidden, attention_mask):
    """Attention probabilities of decoder layer `layer` (B, H, T, T) float32 when the residual
    stream entering it is `hidden` (B, T, d), a left-padded batch with attention_mask (B, T)."""
    position_ids = common.position_ids_from_mask(attention_mask)
    q, k = queries_and_keys(model, layer, hidden, position_ids)
    return attention_probs(q, k, causal_allowed(attention_mask))


def total_variation(p, q):
    """Half the L1 distance between attention rows: (..., K) x (..., K) -> (...)."""
    return 0.5 * (p - q).abs().sum(-1)


def row_shift(clean, patched, query_rows):
    """Total variation between clean and patched attention, averaged over heads: `last`, at each
    row's last query position, and `all`, averaged over the query positions in query_rows
    (B, Q) bool. clean, patched: (B, H, Q, K). Returns dict of (B,) float32 CPU tensors."""
    tv = total_variation(clean, patched).mean(1)  # (B, Q), averaged over heads
    rows = query_rows.to(tv.device).float()
    return {"last": tv[:, -1].cpu(),
            "all": ((tv * rows).sum(1) / rows.sum(1).clamp(min=1)).cpu()}


@torch.no_grad()
def attention_shift(model, layer, clean, patched, attention_mask):
    """How far a patch of the stream entering decoder `layer` moves that layer's attention:
    clean, patched (B, T, d) left-padded with attention_mask (B, T). Returns dict of (B,)
    float32 CPU tensors: `last` (the last prompt position's rows) and `all` (every real
    position's rows), each the total variation averaged over heads. Rows whose patch is a no-op
    come back exactly 0."""
    before = layer_attention(model, layer, clean, attention_mask)
    after = layer_attention(model, layer, patched, attention_mask)
    return row_shift(before, after, attention_mask.bool())
