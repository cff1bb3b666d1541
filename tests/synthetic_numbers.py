"""Synthetic activations in which only the numbers are shared across languages, for the
--drop-numbers tests of C and D.

Problem i (i = 0..9) is "Tom has {i} apples." in English and "小明有{i}个苹果。" in Chinese: the
same template in every problem, one single-digit number each. A fake `capture_layer_outputs` gives every
position the state 3 * e_key, with e_key one of a set of orthonormal vectors: key = the digit for a
token that holds one (the English and the Chinese "3" get the same state), else the token id
(English and Chinese share no other token). So the two versions of problem i share exactly their
number position, and every problem's template positions are identical to every other's.
"""
import torch

import common

DIGITS = range(10)
N_PROBLEMS = len(DIGITS)


def pairs():
    return [{"id": f"n{i}", "en": f"Tom has {i} apples.", "zh": f"小明有{i}个苹果。", "answer": i}
            for i in DIGITS]


def fake_capture(tokenizer, d):
    """A stand-in for common.capture_layer_outputs with the states described above."""
    keys = {}

    def state(token_id):
        text = tokenizer.decode([int(token_id)])
        digits = [ch for ch in text if ch.isdigit()]
        key = ("digit", digits[0]) if digits else ("token", int(token_id))
        index = keys.setdefault(key, len(keys))
        assert index < d, "more distinct tokens than dimensions"
        vector = torch.zeros(d)
        vector[index] = 3.0
        return vector

    def capture(model, input_ids, attention_mask, layers, cache=None):
        states = torch.stack([torch.stack([state(t) for t in row]) for row in input_ids])
        return {layer: states for layer in layers}

    return capture


def activations(tiny, monkeypatch, drop_numbers, pool):
    """The shared extraction (common.extract_activations, layer 0) of the zh texts then the en
    texts, over the fake states; pool as extract_activations takes it."""
    model, tokenizer = tiny
    monkeypatch.setattr(common, "capture_layer_outputs",
                        fake_capture(tokenizer, common.hidden_size(model)))
    texts = [p["zh"] for p in pairs()] + [p["en"] for p in pairs()]
    return common.extract_activations(model, tokenizer, texts, [0], pool=pool,
                                      drop_numbers=drop_numbers, cache_dir=None)
