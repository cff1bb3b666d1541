"""What the Phase 3 experiments share about the model: loading it, the Z basis, hooks and subspace
patching, and activation extraction (pooled means, token clouds, the on-disk cache). Prompts and
answers live in zcausal/problems.py, decoding in zcausal/decoding.py, run bookkeeping in
zcausal/runs.py, a model split across devices (--device-map) in zcausal/placement.py.

Conventions used throughout:
- Layers are 0-indexed `model.model.layers[l]`; "hidden state at layer l" is the output of decoder
  layer l (the residual stream after it). Layer -1 means the embeddings (the input of layer 0).
- Bases are float32 tensors of shape (k, d) with orthonormal rows; P = V.T @ V is never formed on
  the hot path, projections are applied in low-rank form (x V^T) V.
- Batches are left-padded, so the last column is every row's last prompt token.
- Inputs go to input_device(model), the embedding's device; under --device-map, hooks move them on.
"""
import functools
import hashlib
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from zcausal import placement
from zcausal.placement import device_split, input_device, read_weight  # noqa: F401  (accessors)
from zcausal.runs import UsageError

DEFAULT_MODEL = "Qwen/Qwen2.5-3B"
TINY_MODEL = "tiny-random"  # a small random Qwen2 built in-process: offline smoke runs and tests


# ----------------------------------------------------------------------------------------------
# Model loading

# Text the tiny tokenizer is trained on: enough English, Chinese, digits and punctuation that every
# prompt in prompts.json tokenizes into short pieces (byte-level BPE covers any other text anyway).
_TINY_CORPUS = [
    "Question: Tom buys 3 apples for 4 dollars each. How much does he pay? Answer: 12",
    "The answer is 42. Let's think step by step. 3 + 4 = 7, 12 - 5 = 7, 6 * 8 = 48, 9 / 3 = 3.",
    "A train travels 60 kilometers per hour for 2 hours. How far does it go? The total is 120.",
    "问题：小明有3个苹果，又买了5个。他现在有多少个苹果？答案：8",
    "答案是42。一步一步地想。老师把24支铅笔平均分给6个学生，每个学生得到几支？",
    "火车每小时行驶60公里，行驶了2小时。一共行驶了多少公里？商店打折，价格是多少元？",
    "0123456789 ,.:;?!()[]{}%$+-*/= \n\n",
]


_QWEN_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def tiny_tokenizer():
    """A byte-level BPE tokenizer built in-process (no download), covering Chinese and English."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Qwen2's own pre-tokenizer: every digit its own token and a space before a number a token of
    # its own (" 60" -> " ", "6", "0"), so answer-position scoring is exercised as on real weights.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TINY_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", padding_side="left")


def tiny_config(vocab_size=600):
    """A small Qwen2Config with grouped-query attention (4 query heads share 2 key/value heads)."""
    from transformers import Qwen2Config
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=10000.0, tie_word_embeddings=True, eos_token_id=0, pad_token_id=0,
        bos_token_id=0, initializer_range=0.2)  # large init: well-separated logits, no argmax ties


def resolve_device(device):
    if device:
        return torch.device("cuda" if device == "gpu" else device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_runtime(device, dtype, device_map=None):
    """--device, --dtype and --device-map, checked before anything is loaded or written: an
    unknown device, CUDA asked for where there is none, or a device map that cannot be used
    (placement.check_device_map) is a UsageError; float16 on a CPU only warns (it is emulated
    there, and slower than float32). Returns the device the run computes on."""
    if device_map is not None:
        device = placement.check_device_map(device_map, device)
    try:
        resolved = resolve_device(device)
    except RuntimeError:
        raise UsageError(f"--device {device}: unknown device; pass cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is visible on this machine; "
                         f"pass --device cpu (or leave --device out)")
    if resolved.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: only cpu and cuda are supported")
    if resolved.type == "cpu" and dtype in ("float16", torch.float16):
        import warnings
        warnings.warn("--dtype float16 on a CPU is emulated and slower than float32; "
                      "float32 is the CPU default", stacklevel=2)
    return resolved


def resolve_dtype(dtype, device):
    """bfloat16 on CUDA (float16 can overflow in Qwen2.5), float32 on CPU, unless told otherwise."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise UsageError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def _hub_error(name_or_path, err):
    if Path(name_or_path).expanduser().exists():
        return UsageError(f"could not load a model from folder {name_or_path}: {err}")
    return UsageError(
        f"model {name_or_path!r} is not a local folder and could not be fetched from the hub "
        f"(offline?); download it elsewhere and pass --model PATH to the folder "
        f"(or --model {TINY_MODEL} for an offline smoke run)")


def load_model_config(name_or_path=DEFAULT_MODEL):
    """The model's config alone (cheap), so bad --layer / --k values fail before weights load."""
    if name_or_path == TINY_MODEL:
        return tiny_config()
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(str(Path(name_or_path).expanduser())
                                          if Path(name_or_path).expanduser().exists() else name_or_path)
    except (OSError, ValueError) as err:
        raise _hub_error(name_or_path, err) from None


def load_model(name_or_path=DEFAULT_MODEL, dtype=None, device=None, seed=0, device_map=None,
               offload_folder=None):
    """Load (model, tokenizer) in eval mode on `device`, or spread over devices by `device_map`.

    name_or_path: a hub id, a local folder, or "tiny-random" (small random Qwen2, built with `seed`).
    dtype: None picks bfloat16 on CUDA and float32 on CPU.
    device_map: None, or what --device-map takes (placement.resolve_device_map): the layers placed
    by accelerate (model.hf_device_map says where; input_device(model) is where inputs go), weights
    mapped to "disk" written to offload_folder where the checkpoint cannot serve them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM
    device_map = placement.resolve_device_map(device_map)
    device = resolve_device(device) if device_map is None else placement.map_device(device_map)
    dtype = resolve_dtype(dtype, device)
    if name_or_path == TINY_MODEL:
        tokenizer = tiny_tokenizer()
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(tiny_config(len(tokenizer))).to(dtype)
        if device_map is not None:
            model = placement.dispatch(model, device_map, offload_folder)
    else:
        local = Path(name_or_path).expanduser()
        source = str(local) if local.exists() else name_or_path
        placed = {} if device_map is None else dict(device_map=device_map,
                                                    offload_folder=offload_folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placed)
        except (OSError, ValueError) as err:
            raise placement.map_error(err, device_map) or _hub_error(name_or_path, err) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device_map is None:  # a dispatched model must not be moved: its hooks hold the placement
        model.to(device=device, dtype=dtype)
    model.eval()
    model.name_or_path_for_results = name_or_path
    return model, tokenizer


# Architecture accessors: experiments never spell out model.model.layers[i].

def decoder_layers(model):
    return model.model.layers


def embeddings(model):
    return model.model.embed_tokens


def num_layers(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.num_hidden_layers


def hidden_size(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.hidden_size


def check_layer(model_or_config, layer, flag="--layer", alternative="--depth F"):
    """`layer` must be a decoder layer of the model; the error names the script's own `flag` and
    the flag that can replace it there (`alternative`; None where the script has none)."""
    n = num_layers(model_or_config)
    if not (isinstance(layer, int) and 0 <= layer < n):
        instead = f" (or {alternative})" if alternative else ""
        raise UsageError(f"layer {layer} does not exist: this model has layers 0..{n - 1}; "
                         f"pass {flag} between 0 and {n - 1}{instead}")
    return layer


def depth_to_layer(model_or_config, fraction, flag="--depth"):
    """The layer at a fraction of the model's depth: round(F * number of layers), so one value
    means the same depth on every model (F = 0.889: layer 32 of 36, 25 of 28, 21 of 24)."""
    n = num_layers(model_or_config)
    if not 0 < fraction < 1:
        raise UsageError(f"{flag} {fraction} is not a fraction of depth; pass a value in (0, 1), "
                         f"e.g. {flag} 0.889 for layer 32 of 36")
    layer = int(round(fraction * n))
    if layer >= n:
        raise UsageError(f"{flag} {fraction} gives layer {layer}, past the last layer {n - 1} of "
                         f"this model; pass a smaller fraction")
    return layer


def check_k(model_or_config, k, allow_full=True, why="k = d would leave Z-perp empty",
            flag="--k"):
    """1 <= k <= d (k < d where k = d means nothing: Z-perp of a k = d subspace is empty; `why`
    says so in the script's own terms); the error names the flag given (`flag`)."""
    d = hidden_size(model_or_config)
    top = d if allow_full else d - 1
    if not (isinstance(k, int) and 1 <= k <= top):
        why = "" if allow_full else f" ({why})"
        raise UsageError(f"k={k} is out of range: the hidden size is {d}{why}; pass {flag} "
                         f"between 1 and {top}")
    return k


# ----------------------------------------------------------------------------------------------
# The Z basis (per-head kernels W_Q^T W_K, then the SVD of their stack)

def head_projections(model, layer, fold_norm=False):
    """Per query head h, (W_Q^h, W_K^g(h)): two float32 tensors (H, d_head, d) on the CPU.

    W_Q^h is rows [h*d_head, (h+1)*d_head) of q_proj.weight; g(h) = h // (H / H_kv) picks the
    key/value group. Raw weights, as Z is defined (no bias, no RoPE); `fold_norm` folds the layer's
    input RMSNorm gain into both (x -> diag(gamma) x).
    """
    config = model.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    d_head = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    attn = decoder_layers(model)[layer].self_attn
    w_q = read_weight(attn.q_proj).float().cpu()
    w_k = read_weight(attn.k_proj).float().cpu()
    if fold_norm:
        gamma = read_weight(decoder_layers(model)[layer].input_layernorm).float().cpu()
        w_q, w_k = w_q * gamma, w_k * gamma
    group = torch.arange(n_heads) // (n_heads // n_kv)
    return w_q.view(n_heads, d_head, -1), w_k.view(n_kv, d_head, -1)[group]


def _kernel_right_vectors(w_q, w_k, k):
    """Top-k right singular vectors of each K^h = W_Q^h.T W_K^h, (H, k, d) float64.

    K^h has rank <= d_head, so with W_Q^h.T = Q1 R1 and W_K^h.T = Q2 R2 (thin QR) it is
    Q1 (R1 R2.T) Q2.T, and the SVD of the small d_head x d_head core U S V.T gives K^h's right
    singular vectors Q2 V: the same subspaces as the full d x d SVD at a fraction of the cost
    (seconds instead of minutes at d = 2048). Beyond rank d_head the singular values are zero and
    the vectors arbitrary, so k > d_head falls back to the full SVD.
    """
    if k > w_q.shape[1]:
        return torch.linalg.svd(torch.einsum("hed,hef->hdf", w_q, w_k)).Vh[:, :k, :]
    q1, r1 = torch.linalg.qr(w_q.transpose(1, 2))
    q2, r2 = torch.linalg.qr(w_k.transpose(1, 2))
    core_vh = torch.linalg.svd(r1 @ r2.transpose(1, 2)).Vh  # (H, d_head, d_head)
    return (core_vh @ q2.transpose(1, 2))[:, :k, :]


def z_basis(model, layer, k, fold_norm=False):
    """The multi-head Z mask V_Z: float32 (k, d) with orthonormal rows, on the CPU.

    Top-k right singular vectors of each head's kernel, stacked (H*k, d), then the top-k right
    singular vectors of the stack. SVDs in float64 for a stable ordering.
    """
    check_layer(model, layer)
    check_k(model, k)
    w_q, w_k = head_projections(model, layer, fold_norm)
    per_head = _kernel_right_vectors(w_q.double(), w_k.double(), k)  # (H, k, d)
    stacked = per_head.reshape(-1, per_head.shape[-1])
    return torch.linalg.svd(stacked, full_matrices=False).Vh[:k].float()


def random_basis(d, k, seed):
    """A random k-dimensional subspace of R^d (Haar), float32 (k, d), orthonormal rows, seeded."""
    gen = torch.Generator().manual_seed(int(seed))
    gauss = torch.randn(d, k, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r))  # sign fix makes the distribution uniform
    return q.T.contiguous().float()


def project(x, basis):
    """P_Z x in low-rank form, (x V^T) V. x: (..., d); basis: (k, d). Float32 result."""
    basis = basis.to(x.device, torch.float32)
    return (x.float() @ basis.T) @ basis


# ----------------------------------------------------------------------------------------------
# Hooks

@contextmanager
def layer_output_hook(model, layer, fn):
    """Call fn(hidden) on decoder layer `layer`'s output (layer -1: the embeddings), hidden
    (B, T, d); a tensor returned by fn replaces it. The hook is removed on exit, also on an exception. Works whether the layer returns
    a tensor (transformers 5) or a tuple whose first element is the hidden state (4.x)."""
    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = fn(hidden)
        if new is None:
            return None
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    module = embeddings(model) if layer == -1 else decoder_layers(model)[layer]
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_layer_outputs(model, input_ids, attention_mask, layers, cache=None):
    """Hidden states after each of `layers` (-1 = embeddings): dict layer -> (B, T, d), model dtype,
    on input_ids' device (moved from their layers'). Stops the forward pass after the last
    requested layer; with a `cache`, the layers up to it leave their keys and values there."""
    layers = sorted(set(layers))
    captured = {}
    last = layers[-1]

    def grab(layer):
        def fn(hidden):
            captured[layer] = hidden.detach().to(input_ids.device)
            if layer == last:
                raise _StopForward
        return fn

    handles = []
    if -1 in layers:
        handles.append(embeddings(model).register_forward_hook(
            lambda m, i, o: grab(-1)(o)))
    try:
        with _hooks(model, [(l, grab(l)) for l in layers if l >= 0]):
            model(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=cache is not None,
                  **({cache_kwarg(model): cache} if cache is not None else {}))
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured


@contextmanager
def _hooks(model, layer_fns):
    """Several layer_output_hooks at once: [(layer, fn), ...]."""
    if not layer_fns:
        yield
        return
    (layer, fn), rest = layer_fns[0], layer_fns[1:]
    with layer_output_hook(model, layer, fn), _hooks(model, rest):
        yield


def mean_pool(hidden, mask):
    """Mean over the positions where mask is True. hidden (B, T, d), mask (B, T) -> (B, d) float32."""
    mask = mask.to(hidden.device, torch.float32)
    summed = torch.einsum("btd,bt->bd", hidden.float(), mask)
    return summed / mask.sum(1, keepdim=True).clamp(min=1)


# ----------------------------------------------------------------------------------------------
# Patching

@dataclass
class SubspacePatch:
    """A per-row patch of the residual stream at decoder layer `layer`: h <- h + P_S (s - h).

    P_S projects on the replaced subspace S: span(basis rows), or its complement when `complement`.
    The plan's conditions are special cases (V = Z basis, padded with zero rows to a common k):
      none: V = 0, complement False (P_S = 0)     Z:      V = V_Z, complement False
      full: V = 0, complement True  (P_S = I)     Z-perp: V = V_Z, complement True
    basis: (B, k, d) float32; complement: (B,) bool; source_mean: (B, d) float32, the source for
    generated positions (and for prompt positions when source_tokens is None); source_tokens:
    optional (B, T, d), a per-position source aligned with the left-padded prompt (OT, `last`);
    prompt_mask: optional (B, T) bool aligned the same way, the prompt positions patched (None:
    all; False positions keep their state exactly: `last:m` sources, leaving the sink alone);
    patch_generated: (B,) bool, whether generated positions are patched too (scope "all").
    site: "output" patches decoder layer `layer`'s output ("the hidden state at layer
    l"); "input" patches its input, the state its W_Q and W_K read (= layer l-1's output, the
    embeddings for l = 0). `stream` is the residual-stream index either way (-1: embeddings).
    """
    layer: int
    basis: torch.Tensor
    complement: torch.Tensor
    source_mean: torch.Tensor
    patch_generated: torch.Tensor
    source_tokens: torch.Tensor = None
    prompt_mask: torch.Tensor = None
    site: str = "output"
    phase: str = "prompt"  # set by the decoding loop: "prompt" or "generate"

    @property
    def stream(self):
        """Index of the residual stream patched: the output of this decoder layer (-1: embeddings)."""
        return self.layer if self.site == "output" else self.layer - 1

    def __call__(self, hidden):
        if self.phase == "prompt":
            source = self.source_tokens if self.source_tokens is not None else self.source_mean[:, None]
            patched = patch_subspace(hidden, self.basis, self.complement, source)
            if self.prompt_mask is None:
                return patched
            return torch.where(self.prompt_mask.to(hidden.device)[..., None], patched, hidden)
        if not bool(self.patch_generated.any()):
            return None
        patched = patch_subspace(hidden, self.basis, self.complement, self.source_mean[:, None])
        return torch.where(self.patch_generated.to(hidden.device)[:, None, None], patched, hidden)

    def to(self, device):
        for name in ("basis", "complement", "source_mean", "patch_generated", "source_tokens",
                     "prompt_mask"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self


def patch_subspace(hidden, basis, complement, source):
    """h + P_S (s - h) per row, with P_S = V^T V or I - V^T V; float32 accumulation, no d x d matrix.

    hidden: (B, T, d); basis: (B, k, d); complement: (B,) bool; source: (B, T, d) or (B, 1, d).
    Rows with a zero basis and complement False come back bit-identical.
    """
    basis = basis.to(hidden.device, torch.float32)
    delta = source.to(hidden.device, torch.float32) - hidden.float()
    along = torch.einsum("btk,bkd->btd", torch.einsum("btd,bkd->btk", delta, basis), basis)
    replaced = torch.where(complement.to(hidden.device)[:, None, None], delta - along, along)
    return (hidden.float() + replaced).to(hidden.dtype)


# ----------------------------------------------------------------------------------------------
# Tokenising, decoding and scoring

class LanguageClasses:
    """The vocabulary split by script, for language_margin: latin and cjk (V,) bool tensors
    (problems.language_token_classes) and the id of the lone space token, which Qwen writes before
    some Chinese units ("60 个" is 6, 0, " ", "个") and which belongs to neither language."""

    def __init__(self, tokenizer):
        import numpy as np
        from zcausal.problems import language_token_classes
        latin, cjk = language_token_classes(tokenizer)
        self.latin, self.cjk = torch.from_numpy(np.asarray(latin)), torch.from_numpy(np.asarray(cjk))
        space = tokenizer(" ", add_special_tokens=False)["input_ids"]
        self.space_id = space[0] if len(space) == 1 else None

    def to(self, device):
        self.latin, self.cjk = self.latin.to(device), self.cjk.to(device)
        return self


def language_margin(logp_next, logp_after_space, classes):
    """log P(the next word is Latin) - log P(it is Chinese) after an answer: (B,) float32.

    logp_next: (B, V) log-probabilities right after the answer's last token; logp_after_space:
    (B, V) after the answer and a lone space (None where the tokenizer has no such token). A word
    comes either now or after a space, so P(class) = p_next(class) + p_next(space) p_space(class):
    a margin that does not depend on which unit word the model would write, or on whether it puts
    a space token first. Positive: English; negative: Chinese.
    """
    latin, cjk = classes.latin.to(logp_next.device), classes.cjk.to(logp_next.device)
    logp_next = logp_next.float()

    def mass(mask):
        now = torch.logsumexp(logp_next[:, mask], -1)
        if logp_after_space is None or classes.space_id is None:
            return now
        later = logp_next[:, classes.space_id] + torch.logsumexp(
            logp_after_space.float()[:, mask], -1)
        return torch.logaddexp(now, later)

    return mass(latin) - mass(cjk)


def position_ids_from_mask(attention_mask):
    """Positions that ignore left padding, so a padded row sees the same RoPE angles as alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def tokenize_left_padded(tokenizer, texts, spans=None, device="cpu"):
    """Tokenise and left-pad. spans: optional [(start, end)] character ranges per text.

    Returns input_ids (B, T) long, attention_mask (B, T) long and span_mask (B, T) bool, True on
    the tokens that overlap each text's span (all real tokens when spans is None).
    """
    enc = [tokenizer(t, add_special_tokens=False, return_offsets_mapping=True) for t in texts]
    width = max(len(e["input_ids"]) for e in enc)
    ids = torch.full((len(texts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    span_mask = torch.zeros((len(texts), width), dtype=torch.bool)
    for row, e in enumerate(enc):
        n = len(e["input_ids"])
        ids[row, width - n:] = torch.tensor(e["input_ids"])
        mask[row, width - n:] = 1
        if spans is None:
            span_mask[row, width - n:] = True
        else:
            start, end = spans[row]
            inside = [s < end and e_ > start for s, e_ in e["offset_mapping"]]
            span_mask[row, width - n:] = torch.tensor(inside)
    return ids.to(device), mask.to(device), span_mask.to(device)


def new_cache(model):
    from transformers import DynamicCache
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers < 4.56
        return DynamicCache()


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(model_class):
    import inspect
    params = inspect.signature(model_class.forward).parameters
    return next((name for name in ("cache", "past_key_values", "past_key_value") if name in params),
                "past_key_values")


def cache_kwarg(model):
    """transformers 5 calls the KV cache argument `cache`; 4.x calls it `past_key_values`. An
    unknown name would be swallowed by **kwargs and silently disable the cache, so look it up."""
    return _cache_kwarg_of(type(model))


def model_fingerprint(model):
    """A short hash of the model's identity (name, config, dtype and a checksum of its weights)
    for cache keys: another checkpoint at the same path, or another seed, never reuses a cache."""
    with torch.no_grad():
        checksum = [float(read_weight(model.get_submodule(name.rpartition(".")[0]),
                                      name.rpartition(".")[2]).float().abs().sum())
                    for _, (name, _) in zip(range(8), model.named_parameters())] + [
            float(read_weight(decoder_layers(model)[-1].mlp.down_proj).float().abs().sum())]
    blob = json.dumps({"name": getattr(model, "name_or_path_for_results", None),
                       "config": model.config.to_dict(), "weights": checksum,
                       "dtype": str(next(model.parameters()).dtype)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Activation extraction shared by Experiments B, C and D (one batched pass, cached on disk)

DEFAULT_CACHE = Path("results") / "cache"
# A number as written in a question: digits with the separators between them ("80,000", "2.5").
# \d is Unicode-aware, so full-width digits count too.
NUMBER_PATTERN = re.compile(r"\d+(?:[.,]\d+)*")


def number_token_mask(tokenizer, text):
    """(T,) bool over the tokens of `text` (no special tokens, as tokenize_left_padded makes them):
    True on the tokens of its numbers, i.e. every token whose characters overlap a number
    ("80,000" -> 8 0 , 0 0 0; "2.5" -> 2 . 5) or whose own text holds a digit. Whitespace next to a
    number is not part of it (Qwen writes " 16" as " ", "1", "6": the " " stays)."""
    spans = [m.span() for m in NUMBER_PATTERN.finditer(text)]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    flags = [any(start < end_ and end > start_ for start_, end_ in spans)
             or bool(NUMBER_PATTERN.search(tokenizer.decode([token_id])))
             for token_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"])]
    return torch.tensor(flags, dtype=torch.bool)


def kept_positions(tokenizer, texts, attention_mask, drop_first=True, drop_numbers=False,
                   skip_prefix=None):
    """(B, T) bool, aligned with the left-padded `attention_mask` of `texts`: the positions whose
    states enter the token means and clouds. Left out: padding; position 0 with `drop_first`
    (Qwen's attention sink); the first skip_prefix[i] tokens of text i (a list, or None); the tokens
    of numbers with `drop_numbers` (number_token_mask). A text with nothing left is a UsageError."""
    keep = attention_mask.bool().cpu().clone()
    width = keep.shape[1]
    for row, text in enumerate(texts):
        first = width - int(keep[row].sum())
        skip = max(int(drop_first), int(skip_prefix[row]) if skip_prefix is not None else 0)
        keep[row, first:first + skip] = False
        if drop_numbers:
            keep[row, first:] &= ~number_token_mask(tokenizer, text)
        if not keep[row].any():
            raise UsageError(f"the text {text[:40]!r} has no token left once the first token"
                             f"{' and its numbers' if drop_numbers else ''} are left out; "
                             f"remove it from the pairs")
    return keep


def number_token_counts(tokenizer, texts):
    """How many tokens the texts have and how many of them belong to numbers (for config.json)."""
    masks = [number_token_mask(tokenizer, text) for text in texts]
    return {"tokens": int(sum(len(m) for m in masks)),
            "number_tokens": int(sum(int(m.sum()) for m in masks))}


def _activation_cache_path(cache_dir, model, texts, layers, pool, drop_first, drop_numbers,
                           skip_prefix):
    """The cache file for one extraction: the key holds everything that changes its result."""
    if cache_dir is None:
        return None
    key = hashlib.sha256(json.dumps(
        {"model": model_fingerprint(model), "texts": list(texts), "layers": layers, "pool": pool,
         "drop_first": drop_first, "drop_numbers": drop_numbers,
         "skip_prefix": None if skip_prefix is None else [int(s) for s in skip_prefix]},
        ensure_ascii=False).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"acts-{key}.pt"


@torch.no_grad()
def extract_activations(model, tokenizer, texts, layers, pool="mean", drop_first=True,
                        drop_numbers=False, skip_prefix=None, batch_size=16,
                        cache_dir=DEFAULT_CACHE, desc="extract"):
    """Decoder-layer outputs (forward hooks, so the last layer is before the final norm) for texts.

    layers: list of layer indices, -1 = the embeddings.
    pool="mean": returns float32 (N, len(layers), d), the mean over each text's kept tokens.
    pool=None: returns a list of N float16 tensors (T_i, len(layers), d), the kept token states.
    Kept tokens (kept_positions): all but position 0 with drop_first (Qwen's attention sink, whose
    norm dominates any mean), the first skip_prefix[i] tokens of text i, and with drop_numbers the
    tokens of numbers (number_token_mask). Texts are batched by length; the result is cached under
    cache_dir keyed by the model, the texts (so the template), the layers and every option above:
    a changed input never reuses a stale file. cache_dir=None disables the cache.
    """
    from tqdm.auto import tqdm
    layers = [int(l) for l in layers]
    for layer in layers:
        if layer != -1:
            check_layer(model, layer)
    path = _activation_cache_path(cache_dir, model, texts, layers, pool, drop_first, drop_numbers,
                                  skip_prefix)
    if path is not None and path.exists():
        return torch.load(path)
    device = input_device(model)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    results = [None] * len(texts)
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False):
        rows = order[start:start + batch_size]
        ids, mask, _ = tokenize_left_padded(tokenizer, [texts[i] for i in rows], device=device)
        keep = kept_positions(tokenizer, [texts[i] for i in rows], mask, drop_first, drop_numbers,
                              None if skip_prefix is None else [skip_prefix[i] for i in rows])
        captured = capture_layer_outputs(model, ids, mask, layers)
        states = torch.stack([captured[l] for l in layers], 2)  # (B, T, L, d)
        for b, i in enumerate(rows):
            tokens = states[b][keep[b].to(states.device)]
            results[i] = tokens.float().mean(0).cpu() if pool == "mean" else tokens.half().cpu()
    out = torch.stack(results) if pool == "mean" else results
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(out, tmp)
        tmp.replace(path)  # atomic: a crash never leaves a half-written cache file
    return out


# --replot means the same in every script: nothing is measured again.
REPLOT_HELP = ("rebuild everything the finished run in --out derives from its CSVs (tables, "
               "summary, figures), without a model; prints what it wrote")


def add_common_args(parser, out_default):
    """Flags every script takes, with the same names and defaults everywhere."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"hub id, local folder, or {TINY_MODEL} (a small random model built "
                             f"in-process, for smoke runs)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="weights and activations; None: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda; None: cuda if available, else cpu")
    placement.add_device_map_arg(parser)
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds torch, numpy and random (random subspaces, splits, pairings)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    parser.add_argument("--out", type=Path, default=Path("results") / out_default,
                        help="folder for CSVs and config.json")
    parser.add_argument("--figures", type=Path, default=Path("figures"),
                        help="root folder for PNGs; a run's figures go to its --out path mirrored "
                             "under it (results/r1/exp_a -> figures/r1/exp_a/)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in --out (its files and figures are removed first)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in --out (same flags as its "
                             "config.json); finished work is kept")
    parser.add_argument("--replot", action="store_true", help=REPLOT_HELP)
    return parser


def cache_dir_arg(value):
    """--cache-dir: a folder, or 'none' for no cache."""
    return None if str(value).lower() == "none" else Path(value)


def add_activation_args(parser):
    """Flags of the scripts that read the shared activation extraction (B, C and D)."""
    parser.add_argument("--fold-norm", action="store_true",
                        help="fold the layer's input RMSNorm gain into W_Q, W_K before the SVD "
                             "(default: the raw weights, as Z is defined)")
    parser.add_argument("--keep-first-token", action="store_true",
                        help="include position 0 (the attention sink, whose norm dominates a "
                             "mean) in the token means and clouds")
    parser.add_argument("--drop-numbers", action="store_true",
                        help="leave the tokens of numbers (every token with a digit, and the "
                             "separators inside a number such as 80,000) out of the token means "
                             "and clouds: the zh and en versions of a problem share their digits, "
                             "which alone could match a problem across languages")
    parser.add_argument("--cache-dir", type=cache_dir_arg, default=DEFAULT_CACHE,
                        help="activation cache folder, or 'none' for no cache")
    return parser


PLAN_NUM_LAYERS = 36  # Qwen2.5-3B: the model the plan's layer numbers refer to
PLAN_Z_LAYER = 32     # the plan's layer of Z


def plan_layer_at_depth(model_or_config, plan_layer=PLAN_Z_LAYER):
    """The plan's layer (numbered of 36) at the same fraction of this model's depth, capped at the
    last layer: min(L - 1, round(plan_layer / 36 * L)); 32 -> 21 of 24, 25 of 28, 32 of 36."""
    n = num_layers(model_or_config)
    return min(n - 1, int(round(plan_layer / PLAN_NUM_LAYERS * n)))
