"""On a CUDA machine (skipped elsewhere): the tiny model in bfloat16 on the GPU. The fast engine
agrees with the eager loop within what bf16 rounding alone moves, CUDA graphs change nothing (A's
unit-word stop included), a patch on the GPU equals the CPU float32 patch within bf16 tolerance,
and every script's tiny run completes with --device cuda."""
import dataclasses
import importlib.util
import subprocess
import sys

import pytest
import torch

import common
from zcausal import decoding, fast_decode, problems, runs
from helpers import MIXED, TINY_RUN_FLAGS, conditions

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def gpu_and_cpu():
    """The same seed-0 tiny model twice: bfloat16 on the GPU, float32 on the CPU."""
    gpu = common.load_model(common.TINY_MODEL, dtype="bfloat16", device="cuda")
    cpu = common.load_model(common.TINY_MODEL, dtype="float32", device="cpu")
    return gpu, cpu


def _patch(cpu_model):
    """none, Z, Z-perp, full and random-Z rows (mixed scopes), four times over: 20 rows. Built once
    from the float32 model, so both devices patch with the same bases and sources."""
    patch = conditions(cpu_model, 5)
    return dataclasses.replace(patch, **{f: torch.cat([getattr(patch, f)] * 4) for f in (
        "basis", "complement", "source_mean", "patch_generated")})


def _decode(model, tok, engine, patch=None, n=8, **options):
    ids, mask, _ = common.tokenize_left_padded(tok, MIXED * 4)  # 20 rows, 5 prompt lengths
    return decoding.generate_and_score(model, ids, mask, n, patch, return_logits=True,
                                       engine=engine, **options)


def _deviation(a, b):
    """Max |logit difference| over the steps where both decodes still have the same tokens."""
    same = (a["tokens"] == b["tokens"]).long().cumprod(1).bool()  # prefix agreement per row
    prior = torch.cat([torch.ones_like(same[:, :1]), same[:, :-1]], 1)  # logits of step t need t-1
    return float((a["logits"] - b["logits"]).abs()[prior].max())


@pytest.mark.parametrize("patched", [False, True])
def test_fast_engine_agrees_with_eager_within_the_bf16_floor(gpu_and_cpu, patched):
    (gpu, tok), (cpu, _) = gpu_and_cpu
    patch = _patch(cpu) if patched else None
    reference = _decode(cpu, tok, "eager", patch)
    eager = _decode(gpu, tok, "eager", patch)
    fast = _decode(gpu, tok, "fast", patch)
    floor = _deviation(eager, reference)  # what bf16 rounding alone moves the eager loop by
    assert floor > 0  # the floor is real: bf16 is not float32
    assert _deviation(fast, eager) <= 2 * floor + 1e-6
    assert _deviation(fast, reference) <= 3 * floor + 1e-6
    rows_differ = lambda a, b: int((a["tokens"] != b["tokens"]).any(1).sum())  # noqa: E731
    assert rows_differ(fast, eager) <= rows_differ(eager, reference) + 1


def test_cuda_graphs_replay_the_same_step(gpu_and_cpu, monkeypatch):
    (gpu, tok), (cpu, _) = gpu_and_cpu
    graphed = _decode(gpu, tok, "fast", _patch(cpu))
    monkeypatch.setattr(fast_decode, "USE_CUDA_GRAPHS", False)
    plain = _decode(gpu, tok, "fast", _patch(cpu))
    assert torch.equal(graphed["tokens"], plain["tokens"])
    torch.testing.assert_close(graphed["logits"], plain["logits"], atol=1e-2, rtol=1e-2)


def test_rows_that_all_stop_early_end_the_batch_on_the_gpu(gpu_and_cpu):
    (gpu, tok), _ = gpu_and_cpu
    free = _decode(gpu, tok, "fast", n=12)
    stop = sorted(set(free["tokens"][:, 1].tolist()))  # every row ends at its first or second token
    out = _decode(gpu, tok, "fast", n=12, stop_ids=stop)
    assert (out["lengths"] <= 2).all() and out["steps"] <= decoding.CHECK_EVERY < 11


def test_unit_word_stop_inside_the_cuda_graph(gpu_and_cpu, monkeypatch):
    """A's stop rule (the number, then the first character after it that is not a space) runs
    inside the captured step: on planted traits every row ends where problems.end_of_answer says
    on the same engine's unstopped tokens, with and without CUDA graphs."""
    from test_decoding import _planted_traits
    (gpu, tok), (cpu, _) = gpu_and_cpu
    traits = _planted_traits(gpu.lm_head.out_features, 0)
    free = _decode(gpu, tok, "fast", _patch(cpu), n=12)
    stopped = _decode(gpu, tok, "fast", _patch(cpu), n=12, stop_when_number_ends=True,
                      digits=traits)
    for row, length in zip(free["tokens"].tolist(), stopped["lengths"].tolist()):
        end, _ = problems.end_of_answer(
            [tuple(int(traits[name][t]) for name in problems.TRAITS) for t in row])
        assert length == (end or 12)
    monkeypatch.setattr(fast_decode, "USE_CUDA_GRAPHS", False)
    plain = _decode(gpu, tok, "fast", _patch(cpu), n=12, stop_when_number_ends=True, digits=traits)
    assert torch.equal(plain["tokens"], stopped["tokens"])
    assert torch.equal(plain["lengths"], stopped["lengths"])


def test_patch_on_gpu_equals_cpu_patch_within_bf16(gpu_and_cpu):
    gen = torch.Generator().manual_seed(0)
    B, T, k, d = 6, 9, 5, 64
    hidden = torch.randn(B, T, d, generator=gen) * 4
    basis = torch.stack([common.random_basis(d, k, s) for s in range(B)])
    complement = torch.tensor([False, True] * 3)
    source = torch.randn(B, 1, d, generator=gen) * 4
    want = common.patch_subspace(hidden, basis, complement, source)
    got = common.patch_subspace(hidden.to("cuda", torch.bfloat16), basis.cuda(), complement.cuda(),
                                source.cuda())
    assert got.dtype == torch.bfloat16 and got.is_cuda
    err = (got.float().cpu() - want).norm() / want.norm()
    assert err < 1e-2  # bf16 keeps 8 bits of mantissa: about 4e-3 relative per element


def _run(script, *flags, tmp_path):
    out = tmp_path / script.replace(".py", "")
    result = subprocess.run([sys.executable, str(runs.REPO / script), "--model", common.TINY_MODEL,
                             "--device", "cuda", "--out", str(out), "--figures",
                             str(tmp_path / "figures"), *flags],
                            capture_output=True, text=True, timeout=600, cwd=runs.REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


SCRIPTS = TINY_RUN_FLAGS


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_script_tiny_run_completes_on_cuda(script, tmp_path):
    if not (runs.REPO / script).is_file():
        pytest.skip(f"{script} does not exist yet")
    out = _run(script, *SCRIPTS[script], tmp_path=tmp_path)
    config = out / "config.json"
    if script != "exp_e_layer_sweep.py":  # the sweep's outputs are its own engineer's to name
        assert '"device": "cuda' in config.read_text()


def test_bench_tiny_runs_on_cuda(tmp_path):
    result = subprocess.run([sys.executable, str(runs.REPO / "bench.py"), "--shape", "tiny",
                             "--device", "cuda", "--parts", "a", "step", "--limit", "3", "--out",
                             str(tmp_path / "bench.csv")],
                            capture_output=True, text=True, timeout=600, cwd=runs.REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = runs.load_csv(tmp_path / "bench.csv")
    assert list(rows.part) == ["a", "step"] and rows.device.iloc[0] == torch.cuda.get_device_name()
    assert rows.status.iloc[1] == "ok" and rows.step_ms.iloc[1] > 0
    if importlib.util.find_spec("ot") is not None:  # A's OT source needs POT
        # A decoded on the GPU (its row keeps the timings even if exp_a's summary then failed)
        assert rows.decodes.iloc[0] > 0 and rows.decode_seconds.iloc[0] > 0, rows.note.iloc[0]


def test_layers_split_between_the_gpu_and_the_cpu_give_the_cpu_rows(gpu_and_cpu):
    """Layers that really run on two devices (here the GPU and the CPU: accelerate's main device
    set to the CPU keeps its CPU layers there): every tensor reaches the device of the module it
    meets. float32 on both, so A's readouts and decode, E's rows (the basis layer's attention
    included), DAS's gradient and B's activations match the CPU run."""
    from accelerate import dispatch_model
    import pandas as pd
    from test_device_map import _interchange, _pairs, _patched_decode
    (_, tok), (cpu, _) = gpu_and_cpu
    split = common.load_model(common.TINY_MODEL, device="cpu")[0]
    placed = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": 0,
              "model.layers.1": "cpu", "model.layers.2": 0, "model.layers.3": "cpu",
              "model.norm": 0, "lm_head": "cpu"}
    split = dispatch_model(split, placed, main_device="cpu",
                           skip_keys=split._skip_keys_device_placement)
    split.hf_device_map = placed
    assert common.device_split(split) and common.input_device(split).type == "cpu"
    reference, out = (_patched_decode(m, tok, "eager") for m in (cpu, split))
    assert torch.equal(out["tokens"], reference["tokens"])
    for name in ("patch_size", "attn_tv_last", "attn_tv_all"):
        torch.testing.assert_close(out[name], reference[name], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["scores"][0], reference["scores"][0], atol=1e-4, rtol=1e-4)
    for model in (cpu, split):
        model.requires_grad_(False)
    (_, rows, loss, grad), (_, rows_s, loss_s, grad_s) = (_interchange(m, tok) for m in (cpu, split))
    pd.testing.assert_frame_equal(rows_s, rows, atol=1e-4, rtol=1e-4)
    assert loss_s == pytest.approx(loss, abs=1e-4)
    torch.testing.assert_close(grad_s, grad, atol=1e-4, rtol=1e-3)
    texts = [p["en"] for p in _pairs(tok)]
    a, b = (common.extract_activations(m, tok, texts, [-1, 0, 1, 2, 3], cache_dir=None)
            for m in (cpu, split))
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
