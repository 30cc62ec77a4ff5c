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


# ----------------------------------------------------------------------------- utils/models/decode.py
def _encode(tok, prompts):
    return [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            for p in prompts]


def _reference(model, ids, max_new, stops, pad):
    """model.generate one prompt at a time (no padding), cut after the first stop token."""
    import torch

    out = []
    for p in ids:
        new = model.generate(input_ids=torch.tensor([p]), max_new_tokens=max_new, do_sample=False, eos_token_id=stops,
                             pad_token_id=pad, temperature=None, top_p=None, top_k=None)[0, len(p):].tolist()
        out.append(next((new[:k + 1] for k, t in enumerate(new) if t in stops), new))
    return out


MORE = PROMPTS + [
    [SYSTEM, {"role": "user", "content": "Is a PR interval of 250 ms first-degree AV block?"}],
    [SYSTEM, {"role": "user", "content": "Name two causes of ST elevation."}],
]


def test_decoder_matches_generate_while_rows_leave_and_join(tiny):
    """Greedy tokens equal model.generate's, prompt by prompt, with fewer rows than prompts (waiting prompts
    join as others end), a shared system prompt prefilled once, and a stop token that ends some rows early."""
    from utils.models.decode import decode, supported

    model, tok = tiny
    assert supported(model) is None
    ids = _encode(tok, MORE)
    free_run = _reference(model, ids, 10, [-1], tok.pad_token_id)
    stops = [free_run[0][2], free_run[3][4]]  # rows 0 and 3 end early (others may too)
    expected = _reference(model, ids, 10, stops, tok.pad_token_id)
    assert len({len(e) for e in expected}) > 1  # rows really end at different steps
    out, stats = decode(model, ids, max_new_tokens=10, stop_ids=stops, pad_id=tok.pad_token_id, max_rows=2)
    assert out == expected
    assert stats.new_tokens == sum(len(e) for e in expected) and stats.prefills >= 3


def test_decoder_ends_a_row_whose_first_token_stops_it_and_caps_the_rest(tiny):
    from utils.models.decode import decode

    model, tok = tiny
    ids = _encode(tok, MORE[:3])
    first = _reference(model, ids, 1, [-1], tok.pad_token_id)[1][0]
    out, _ = decode(model, ids, max_new_tokens=6, stop_ids=[first], pad_id=tok.pad_token_id, max_rows=3)
    assert out[1] == [first]
    assert all(len(o) == 6 or o[-1] == first for o in out)
    capped, _ = decode(model, ids, max_new_tokens=6, stop_ids=[], pad_id=tok.pad_token_id, max_rows=3)
    assert [len(o) for o in capped] == [6, 6, 6]


def test_decoder_prefills_a_repeated_prompt_once_and_samples_its_rows_apart(tiny):
    import torch

    from utils.models.decode import decode

    model, tok = tiny
    a, b = _encode(tok, MORE[3:5])
    prompts = [a] * 4 + [b] * 4
    kw = dict(max_new_tokens=6, stop_ids=[], pad_id=tok.pad_token_id, max_rows=8, do_sample=True, temperature=1.0)
    out, stats = decode(model, prompts, generator=torch.Generator().manual_seed(3), **kw)
    again, _ = decode(model, prompts, generator=torch.Generator().manual_seed(3), **kw)
    assert out == again  # repeatable with a generator
    assert stats.prefills == 2  # the shared prefix, then both prompts' own tokens in one admission
    assert len({tuple(o) for o in out[:4]}) > 1  # a group's samples differ


def test_token_picking_follows_top_k_and_top_p():
    import torch

    from utils.models.decode import pick_tokens

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(pick_tokens(logits, False).tolist()) == {0}
    assert set(pick_tokens(logits, True, top_k=2, generator=g).tolist()) == {0, 1}
    # top_p 0.6: 0.5 alone is short of it, 0.5 + 0.3 reaches it, so tokens 0 and 1 stay
    assert set(pick_tokens(logits, True, top_p=0.6, generator=g).tolist()) == {0, 1}
    assert set(pick_tokens(logits, True, top_p=0.4, generator=g).tolist()) == {0}
    share = (pick_tokens(logits, True, generator=g) == 3).float().mean().item()
    assert 0.02 < share < 0.08  # plain sampling keeps the tail at its probability


def test_decoder_leaves_unsupported_settings_to_generate():
    from transformers import GenerationConfig

    from utils.models.decode import unsupported

    assert unsupported(GenerationConfig(do_sample=True, temperature=0.5, top_p=0.9, top_k=0, min_p=None)) == []
    assert unsupported(GenerationConfig(repetition_penalty=1.2, num_beams=2)) == ["num_beams=2",
                                                                                  "repetition_penalty=1.2"]


def test_packed_linears_match_the_plain_matmul_and_are_undone():
    """Big fp32 layers multiply with oneDNN-packed weights inside the block (small ones stay plain), to rounding
    of the plain result; afterwards every layer is its class's own again."""
    import torch

    from utils.models.decode import packed_linears

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 300), torch.nn.Linear(300, 64))
    x = torch.randn(2, 16, 256)
    with torch.no_grad():
        plain = net(x)
        with packed_linears(net, rows=16):
            patched = [i for i, m in enumerate(net) if "forward" in vars(m)]
            packed = net(x)
        after = net(x)
    assert patched == ([0, 1] if torch.backends.mkldnn.is_available() else [])
    assert not any("forward" in vars(m) for m in net)
    assert torch.equal(after, plain)
    assert torch.allclose(packed, plain, atol=1e-4, rtol=1e-4)


def _wide_llama(path):
    """A Llama wide enough (256) for its layers and output layer to be packed, with large random weights."""
    import torch

    from utils.models.tiny import build_tiny_llama

    model, tok = load_for_inference(str(build_tiny_llama(path, hidden_size=256)), dtype="float32")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if "norm" not in name:
                w.copy_(torch.randn(w.shape, generator=gen) * 0.5)
    return model, tok


def _spy(module, name):
    calls, real = [], getattr(module, name)
    setattr(module, name, lambda *a: calls.append(1) or real(*a))
    return calls, lambda: setattr(module, name, real)


def test_decoder_with_packed_layers_matches_generate(tmp_path):
    """The written-out Llama step with fused, packed weights: greedy tokens equal model.generate's while rows
    leave and join (padding columns masked), and the packed step really ran."""
    import torch

    import utils.models.decode as dec

    model, tok = _wide_llama(tmp_path / "wide")
    calls, undo = _spy(dec, "_packed_matmul")
    try:
        ids = _encode(tok, MORE)
        out, stats = dec.decode(model, ids, max_new_tokens=8, stop_ids=[-1], pad_id=tok.pad_token_id, max_rows=3)
    finally:
        undo()
    assert stats.step == "llama"
    assert out == _reference(model, ids, 8, [-1], tok.pad_token_id)
    assert calls or not torch.backends.mkldnn.is_available()
    bare = [[1000, 17, 256, 9], [42, 7], [3000]]  # no shared prefix: the prefill starts from empty buffers
    out, _ = dec.decode(model, bare, max_new_tokens=5, stop_ids=[-1], pad_id=tok.pad_token_id, max_rows=2)
    assert out == _reference(model, bare, 5, [-1], tok.pad_token_id)


def test_decoder_runs_an_adapter_merged_or_falls_back_to_the_model_forward(tmp_path):
    """A LoRA adapter merged into its base (how GRPO samples) runs the written-out step; an unmerged one
    runs the model's own forward with packed layers. Both give model.generate's greedy tokens."""
    import torch
    from peft import LoraConfig, get_peft_model

    import utils.models.decode as dec

    base, tok = _wide_llama(tmp_path / "wide")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"],
                                            init_lora_weights=False)).eval()
    ids = _encode(tok, MORE[:3])
    with torch.no_grad():
        expected = _reference(model, ids, 6, [-1], tok.pad_token_id)
    kw = dict(max_new_tokens=6, stop_ids=[-1], pad_id=tok.pad_token_id, max_rows=3)
    calls, undo = _spy(dec, "_packed_matmul")
    try:
        out, stats = dec.decode(model, ids, **kw)
    finally:
        undo()
    assert (stats.step, out) == ("model", expected)
    assert calls or not torch.backends.mkldnn.is_available()
    model.merge_adapter()
    try:
        out, stats = dec.decode(model, ids, **kw)
    finally:
        model.unmerge_adapter()
    assert (stats.step, out) == ("llama", expected)
    model.disable_adapter_layers()  # the base alone: no adapter applies, nothing merged
    assert dec.LlamaStep.build(model, 3) is not None


def test_bf16_products_round_only_the_matrix_products(tmp_path):
    """decode_dtype bfloat16: every product of the written-out step (and of packed_linears) takes fp32 in and
    gives fp32 out, computed from bf16 copies; logits stay within bf16 rounding of the fp32 step's, the
    decoder says which dtype it multiplied in, and the config's choices map as documented."""
    import pytest
    import torch

    import utils.models.decode as dec

    net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 64))
    x = torch.randn(3, 256)
    with torch.no_grad(), dec.packed_linears(net, rows=3, dtype=torch.bfloat16):
        out = net(x)
    with torch.no_grad():
        h = torch.nn.functional.linear(x.bfloat16(), net[0].weight.bfloat16(), net[0].bias.bfloat16()).float()
        want = torch.nn.functional.linear(h.bfloat16(), net[1].weight.bfloat16(), net[1].bias.bfloat16()).float()
    assert out.dtype == torch.float32 and torch.allclose(out, want, atol=2e-2, rtol=2e-2)
    assert not any("forward" in vars(m) for m in net)

    model, tok = _wide_llama(tmp_path / "wide")
    ids = _encode(tok, MORE[:3])
    kw = dict(max_new_tokens=6, stop_ids=[-1], pad_id=tok.pad_token_id, max_rows=3)
    calls, undo = _spy(dec, "_in_dtype")
    try:
        out16, stats16 = dec.decode(model, ids, matmul_dtype=torch.bfloat16, **kw)
    finally:
        undo()
    _, stats32 = dec.decode(model, ids, **kw)
    assert (stats16.step, stats16.matmul, stats32.matmul) == ("llama", "bfloat16", "float32")
    assert calls and [len(o) for o in out16] == [6, 6, 6]
    # one step's logits, fp32 against bf16 products: close in the way bf16 rounding allows
    prompt = torch.tensor([ids[0]])
    with torch.inference_mode():
        logits = {}
        for dt in (None, torch.bfloat16):
            step = dec.LlamaStep.build(model, 1, dt)
            cache = dec._cache(model.config.num_hidden_layers)
            shape = (1, step.kv_heads, prompt.shape[1], step.head_dim)
            for layer in cache.layers:
                layer.set(torch.empty(shape), torch.empty(shape), 0)
            logits[dt] = step(prompt, torch.arange(prompt.shape[1])[None], cache.layers, 0,
                              torch.ones_like(prompt, dtype=torch.bool))
    assert logits[torch.bfloat16].dtype == torch.float32
    err = (logits[torch.bfloat16] - logits[None]).norm() / logits[None].norm()
    assert 0 < err < 0.05, err
    assert dec.resolve_decode_dtype("model") is None and dec.resolve_decode_dtype("bfloat16") is torch.bfloat16
    assert dec.resolve_decode_dtype("auto") in (None, torch.bfloat16)
    with pytest.raises(ValueError, match="expected one of model, bfloat16, auto"):
        dec.resolve_decode_dtype("fp8")
