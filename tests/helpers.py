"""Small builders shared by the test modules: prompts of different lengths and patches."""
import torch

import common

TEXTS = ["Question: Tom buys 3 apples for 4 dollars each. Answer:", "问题：小明有3个苹果。答案：",
         "The answer is 42."]
# Five prompts of five different token lengths (with the tiny tokenizer's byte-level and its
# Qwen-style pre-tokenizer alike): batches mix lengths, so left padding is exercised.
MIXED = ["The answer is 42.", "A train travels 60 kilometers.", "问题：火车每小时行驶60公里，行驶了2小时。",
         "Question: Tom buys 3 apples for 4 dollars each. Answer:",
         "问题：火车每小时行驶60公里，行驶了2小时。一共行驶了多少公里？答案："]


def make_patch(layer, basis_rows, complement, source_mean, patch_generated, source_tokens=None,
               **fields):
    return common.SubspacePatch(layer=layer, basis=basis_rows, complement=torch.tensor(complement),
                                source_mean=source_mean, source_tokens=source_tokens,
                                patch_generated=torch.tensor(patch_generated), **fields)


def conditions(model, n_rows, layer=2, k=4, seed=0):
    """One row per condition: none, Z, Z-perp, full, random-Z; mixed scopes."""
    d = common.hidden_size(model)
    z, r = common.z_basis(model, layer, k), common.random_basis(d, k, seed)
    bases = [torch.zeros(k, d), z, z, torch.zeros(k, d), r][:n_rows]
    gen = torch.Generator().manual_seed(seed)
    return make_patch(layer, torch.stack(bases), [False, False, True, True, False][:n_rows],
                      torch.randn(n_rows, d, generator=gen) * 3,
                      [False, True, False, True, True][:n_rows])


def has_hooks(model):
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# Each experiment script's flags for a run of a few seconds on the tiny model (its layers 0..3):
# the CUDA tests and the report's tests run the scripts with them.
TINY_RUN_FLAGS = {
    "exp_a_patching.py": ["--layer", "2", "--k", "4", "--n-random", "1", "--limit", "3",
                          "--n-random-logprob", "4", "--max-new-tokens", "4", "--solved", "off",
                          "--min-pairs", "2"],
    "exp_b_residual.py": ["--layer", "2", "--k", "4", "--n-random", "2", "--limit", "4",
                          "--cache-dir", "none"],
    "exp_c_ard_mmd.py": ["--layers", "1", "3", "--layer", "2", "--k", "8", "--steps", "10",
                         "--min-steps", "0", "--limit", "12", "--cache-dir", "none"],
    "exp_d_bridge.py": ["--layer", "2", "--k", "4", "--limit", "12", "--n-shuffles", "10",
                        "--n-folds", "3", "--cache-dir", "none"],
    "exp_e_layer_sweep.py": ["--limit", "6", "--solved", "off", "--min-pairs", "6", "--layer", "2", "--k", "8", "--n-random", "3",
                             "--decode-limit", "2", "--das-k", "4", "--das-steps", "4"],
}


# The smoke commands the README shows, exactly (tests/test_readme.py holds the README to them; the
# experiments' tests run each one end to end).
SMOKE_COMMANDS = {
    "A": "python exp_a_patching.py --model tiny-random --smoke",
    "B": "python exp_b_residual.py --model tiny-random --smoke",
    "C": "python exp_c_ard_mmd.py --model tiny-random --smoke",
    "D": "python exp_d_bridge.py --model tiny-random --smoke",
    "E": "python exp_e_layer_sweep.py --model tiny-random --smoke",
}


def smoke_argv(name):
    """The flags of the README's smoke command of experiment `name` (after `python script.py`)."""
    return SMOKE_COMMANDS[name].split()[2:]
