"""utils/models/generation.py and data/formats.py: prompts in the answer format, batched left-padded generation."""

import pytest

from utils.data.formats import FORMAT_INSTRUCTIONS, with_format_instructions
from utils.models.generation import generate, stop_token_ids
from utils.models.loading import load_for_inference

SYSTEM = {"role": "system", "content": "You are a careful ECG assistant."}


def test_format_instructions_go_into_the_system_prompt():
    msgs = [SYSTEM, {"role": "user", "content": "Is a PR of 250 ms long?"}]
    assert with_format_instructions(msgs, "plain") == msgs
    out = with_format_instructions(msgs, "reasoning")
    assert out[0]["content"] == SYSTEM["content"] + FORMAT_INSTRUCTIONS["reasoning"]
    assert out[1:] == msgs[1:] and msgs[0]["content"] == SYSTEM["content"]  # input left as it was
    no_system = with_format_instructions(msgs[1:], "reasoning")
    assert no_system[0]["role"] == "system" and "<think>" in no_system[0]["content"] and len(no_system) == 2


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    """The tiny Llama with large random weights: its greedy output then depends on every prompt token
    (with the small initialisation it repeats one token whatever the prompt)."""
    import torch

    model, tok = load_for_inference(str(tiny_llama), dtype="float32")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if "norm" not in name:
                w.copy_(torch.randn(w.shape, generator=gen) * 0.5)
    return model, tok


PROMPTS = [
    [SYSTEM, {"role": "user", "content": "Hi"}],
    [SYSTEM, {"role": "user", "content": "What does a long QT interval mean for a patient taking sotalol daily?"}],
    [{"role": "user", "content": "Explain the P wave, the PR interval and the QRS complex, one sentence each."}],
]


def test_batched_left_padded_generation_matches_one_by_one(tiny):
    model, tok = tiny
    batched = generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=8, batch_size=1)[0] for p in PROMPTS]
    assert batched == single  # padding on the left does not change what a row generates
    assert all(isinstance(t, str) for t in batched) and len(set(batched)) > 1  # in prompt order, not sorted


def test_generation_stops_at_max_new_tokens_and_drops_the_prompt(tiny):
    model, tok = tiny
    import utils.models.generation as g

    (out,) = generate(model, tok, PROMPTS[:1], max_new_tokens=5)
    assert g.last_stats.new_tokens <= 5 and g.last_stats.prompts == 1
    assert "careful ECG assistant" not in out and "<|start_header_id|>" not in out


def test_sampling_is_repeatable_with_a_seed(tiny):
    model, tok = tiny
    a = generate(model, tok, PROMPTS[:2], max_new_tokens=6, do_sample=True, temperature=1.0, seed=7,
                 num_return_sequences=3)
    b = generate(model, tok, PROMPTS[:2], max_new_tokens=6, do_sample=True, temperature=1.0, seed=7,
                 num_return_sequences=3)
    assert a == b and all(len(x) == 3 for x in a)
    assert model.training is False


def test_stop_tokens_include_the_end_of_turn(tiny):
    model, tok = tiny
    assert tok.convert_tokens_to_ids("<|eot_id|>") in stop_token_ids(tok, model)
