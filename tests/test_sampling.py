"""course_lib.inference: sampling (temperature, top-k, top-p, end of text), the KV cache, and rows of different
lengths decoding together."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from course_lib.config import GPTConfig
from course_lib.generation import generate_text_simple
from course_lib.inference import (KVCache, decode_step, generate, prefill, sample_next_token, top_k_filter,
                                  top_p_filter)
from course_lib.model import GPTModel

CFG = GPTConfig(vocab_size=301, context_length=16, emb_dim=48, n_heads=4, n_layers=3, drop_rate=0.1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPTModel(CFG).eval()
    with torch.no_grad():  # weights far from their init, so greedy decoding does not repeat one token
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


def _prompt(batch=1, tokens=5, seed=1):
    return torch.randint(0, CFG.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- #
# The KV cache
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("batch, prompt_len", [(1, 5), (2, 5), (1, 16), (1, 40)],
                         ids=["one", "batch-of-two", "prompt-fills-context", "prompt-longer-than-context"])
def test_greedy_with_cache_equals_without_over_100_tokens_and_past_the_context_length(model, batch, prompt_len):
    idx = _prompt(batch, prompt_len)
    with_cache = generate(model, idx, 100, use_cache=True)
    without = generate(model, idx, 100, use_cache=False)
    reference = generate_text_simple(model, idx, 100)  # step 4's greedy loop, no cache at all
    assert with_cache.shape == (batch, prompt_len + 100)  # 105 tokens: far past context_length=16
    assert with_cache.tolist() == without.tolist() == reference.tolist()
    assert len(set(with_cache[0, prompt_len:].tolist())) > 5


def test_cache_equals_no_cache_on_the_explicit_attention_path_and_a_smaller_window(model):
    idx = _prompt()
    for block in model.trf_blocks:
        block.att.use_sdpa = False
    try:
        a = generate(model, idx, 40, context_size=10, use_cache=True)
    finally:
        for block in model.trf_blocks:
            block.att.use_sdpa = True
    assert a.tolist() == generate_text_simple(model, idx, 40, context_size=10).tolist()


def test_cached_logits_equal_a_full_forward_pass(model):
    idx = _prompt(2, 12, seed=4)
    with torch.no_grad():
        full = model(idx)                                   # [2, 12, V]
        cache = KVCache.for_model(model, batch_size=2)
        assert isinstance(cache, KVCache) and cache.max_len == CFG.context_length
        parts = [model(idx[:, :7], kv_cache=cache)]         # prefill 7 tokens
        parts.append(model(idx[:, 7:10], kv_cache=cache))   # 3 more at once: the masked branch
        parts += [model(idx[:, t:t + 1], kv_cache=cache) for t in (10, 11)]  # one at a time
    assert cache.pos == 12
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_reset_and_a_fresh_cache_for_every_prompt(model):
    a, b = _prompt(seed=5), _prompt(seed=6)
    alone = generate(model, b, 20)
    generate(model, a, 20)
    assert generate(model, b, 20).tolist() == alone.tolist()  # nothing carried over from prompt a
    cache = KVCache.for_model(model, 1)
    with torch.no_grad():
        first = model(a, kv_cache=cache)
        cache.reset()
        assert cache.pos == 0
        torch.testing.assert_close(model(a, kv_cache=cache), first)


def test_a_full_cache_is_a_clear_error(model):
    cache = KVCache.for_model(model, 1)
    with torch.no_grad():
        model(_prompt(1, 16), kv_cache=cache)
        with pytest.raises(ValueError, match="context_length"):
            model(_prompt(1, 1), kv_cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        KVCache.for_model(model, 1, max_len=17)


def test_generate_prefills_once_then_feeds_one_token_per_step(model):
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        (args[0].shape[1], kwargs.get("kv_cache") is not None)), with_kwargs=True)
    try:
        generate(model, _prompt(2, 5), 8)
        assert seen == [(5, True)] + [(1, True)] * 7        # prefill, then 7 decode steps: 8 forwards
        seen.clear()
        generate(model, _prompt(1, 14), 6)                  # 14 + 2 fill the context of 16, then the window slides
        assert seen == [(14, True), (1, True), (1, True), (16, False), (16, False), (16, False)]
        seen.clear()
        generate(model, _prompt(1, 5), 3, use_cache=False)
        assert seen == [(5, False), (6, False), (7, False)]
        seen.clear()
        assert generate(model, _prompt(1, 5), 0).shape == (1, 5) and seen == []
    finally:
        handle.remove()


# --------------------------------------------------------------------------- #
# Rows of different lengths in one cache (what a server batches)
# --------------------------------------------------------------------------- #
def _greedy_together(model, prompts, n):
    """Greedy decoding of several prompts in one batch: prefill, then decode_step."""
    cache, logits = prefill(model, prompts)
    out = [[] for _ in prompts]
    for step in range(n):
        next_ids = logits.argmax(-1)                                       # [B]
        for row, token in zip(out, next_ids.tolist()):
            row.append(token)
        if step + 1 < n:
            logits = decode_step(model, cache, next_ids)
    return out, cache


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "explicit"])
def test_prompts_of_different_lengths_decode_together_as_each_alone(model, use_sdpa):
    prompts = [_prompt(1, n, seed=10 + n)[0] for n in (3, 9, 1, 6)]
    for block in model.trf_blocks:
        block.att.use_sdpa = use_sdpa
    try:
        together, cache = _greedy_together(model, prompts, 7)
    finally:
        for block in model.trf_blocks:
            block.att.use_sdpa = True
    assert cache.lengths.tolist() == [3 + 6, 9 + 6, 1 + 6, 6 + 6] and isinstance(cache.pos, torch.Tensor)
    for prompt, row in zip(prompts, together):
        alone = generate_text_simple(model, prompt[None], 7)[0, len(prompt):].tolist()  # no cache at all
        assert row == alone
        assert generate(model, prompt[None], 7)[0, len(prompt):].tolist() == alone
    assert len({tuple(row) for row in together}) == 4


def test_per_row_logits_equal_a_full_forward_of_each_row(model):
    prompts = [_prompt(1, n, seed=20 + n)[0] for n in (2, 7, 4)]
    more = _prompt(3, 3, seed=30)                      # then three tokens per row at once, then one
    last = _prompt(3, 1, seed=31)
    with torch.no_grad():
        cache, first = prefill(model, prompts)
        block = model(more, kv_cache=cache)            # [3, 3, V]: T > 1 on rows at different positions
        one = decode_step(model, cache, last)          # [3, V]
        for b, p in enumerate(prompts):
            full = model(torch.cat([p, more[b], last[b]])[None])[0]           # [len + 4, V]
            n = len(p)
            torch.testing.assert_close(first[b], full[n - 1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(block[b], full[n:n + 3], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(one[b], full[n + 3], atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [2 + 4, 7 + 4, 4 + 4]


def test_prefill_of_equal_lengths_keeps_one_position_and_matches_a_tensor(model):
    idx = _prompt(2, 6, seed=40)
    cache_t, logits_t = prefill(model, idx)
    cache_l, logits_l = prefill(model, [idx[0], idx[1].tolist()])
    assert cache_t.pos == cache_l.pos == 6 and torch.equal(logits_t, logits_l)
    with torch.no_grad():
        torch.testing.assert_close(logits_t, model(idx)[:, -1], atol=1e-5, rtol=1e-5)


def test_a_request_joins_a_running_batch_in_a_free_row(model):
    a, b, c = _prompt(1, 4, seed=50)[0], _prompt(1, 8, seed=51)[0], _prompt(1, 5, seed=52)[0]
    cache, logits = prefill(model, [a, b])
    got_a, got_c = [], []
    for _ in range(3):                                 # a and b decode three tokens
        next_ids = logits.argmax(-1)
        got_a.append(int(next_ids[0]))
        logits = decode_step(model, cache, next_ids)
    c_cache, c_logits = prefill(model, c[None])        # c arrives: prefilled alone, then takes b's row
    cache.load_row(1, c_cache)
    logits[1] = c_logits[0]
    assert cache.lengths.tolist() == [4 + 3, 5]
    for step in range(4):
        next_ids = logits.argmax(-1)
        got_a.append(int(next_ids[0]))
        got_c.append(int(next_ids[1]))
        if step < 3:
            logits = decode_step(model, cache, next_ids)
    assert got_a == generate_text_simple(model, a[None], 7)[0, 4:].tolist()
    assert got_c == generate_text_simple(model, c[None], 4)[0, 5:].tolist()


def test_cache_rows_crop_reset_and_repr(model):
    cache, _ = prefill(model, [[1, 2, 3], [4, 5, 6, 7, 8]], max_len=8)
    assert cache.lengths.tolist() == [3, 5] and cache.max_len == 8
    assert "filled=[3, 5]/8" in repr(cache)
    cache.crop([3, 3])
    assert cache.pos == 3 and "filled=3/8" in repr(cache)
    with pytest.raises(ValueError, match="row 1 holds 3 positions, so it cannot be cropped to 4"):
        cache.crop([3, 4])
    with pytest.raises(ValueError, match="one per row"):
        cache.crop([3])
    cache.reset()
    assert cache.pos == 0 and cache.lengths.tolist() == [0, 0]


def test_batching_errors_are_named(model):
    with pytest.raises(ValueError, match="call model.eval"):
        prefill(model.train(), [[1, 2]])
    model.eval()
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        prefill(model, [[1, 2], []])
    with pytest.raises(ValueError, match="does not fit a cache of max_len=4"):
        prefill(model, [[1] * 5, [2]], max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        prefill(model, [[1]], max_len=17)
    with pytest.raises(TypeError, match="prompt 1 must be a 1-D tensor of integer token ids, got torch.float32"):
        prefill(model, [[1, 2], torch.tensor([1.0, 2.0])])
    with pytest.raises(TypeError, match="prompt 0 must be a 1-D tensor or a list of int token ids"):
        prefill(model, [[1.5, 2]])
    with pytest.raises(TypeError, match="does not take a KV cache"):
        prefill(nn.Sequential(nn.Embedding(5, 4)).eval(), [[1]])
    cache, _ = prefill(model, [[1, 2, 3], [4]], max_len=4)
    with pytest.raises(ValueError, match=r"one token id per row, \[2\] or \[2, 1\], got \(3,\)"):
        decode_step(model, cache, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="KVCache"):
        decode_step(model, "cache", torch.tensor([1, 2]))
    decode_step(model, cache, torch.tensor([1, 2]))    # row 0 now holds 4 of 4
    with pytest.raises(ValueError, match="holds 4 positions and 4 are filled"):
        decode_step(model, cache, torch.tensor([1, 2]))
    other = KVCache(CFG.n_layers + 1, 1, CFG.n_heads, CFG.head_dim, 4)
    with pytest.raises(ValueError, match="same model"):
        cache.load_row(0, other)
    with pytest.raises(ValueError, match="row must be an integer in \\[0, 2\\)"):
        cache.load_row(2, cache)


# --------------------------------------------------------------------------- #
# Sampling
# --------------------------------------------------------------------------- #
def test_temperature_zero_is_argmax(model):
    idx = _prompt(3, 6)
    with torch.no_grad():
        want = model(idx)[:, -1].argmax(-1)
    got = generate(model, idx, 1, temperature=0.0)
    assert got[:, -1].tolist() == want.tolist()
    # top-k and top-p change nothing when decoding greedily
    assert generate(model, idx, 10, temperature=0, top_k=3, top_p=0.5).tolist() == generate(model, idx, 10).tolist()


def test_top_k_never_picks_outside_the_k_best(model):
    idx = _prompt(1, 6).repeat(400, 1)  # 400 independent draws of the next token
    with torch.no_grad():
        best5 = set(model(idx[:1])[0, -1].topk(5).indices.tolist())
    torch.manual_seed(0)
    picked = generate(model, idx, 1, temperature=2.0, top_k=5)[:, -1].tolist()
    assert set(picked) <= best5
    assert len(set(picked)) >= 3  # it does sample: more than one of the five comes up


def test_top_k_filter_keeps_exactly_k():
    logits = torch.randn(4, 50)
    out = top_k_filter(logits, 7)
    assert (out.isfinite().sum(-1) == 7).all()
    kept = torch.where(out.isfinite(), logits, torch.tensor(float("-inf")))
    assert torch.equal(kept.topk(7).values, logits.topk(7).values)
    assert torch.equal(top_k_filter(logits, 1000), logits)


def test_top_p_filter_by_hand():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert top_p_filter(logits, 0.75).isfinite().tolist() == [True, True, False, False]
    assert top_p_filter(logits, 0.8).isfinite().tolist() == [True, True, False, False]
    assert top_p_filter(logits, 0.81).isfinite().tolist() == [True, True, True, False]
    assert top_p_filter(logits, 0.1).isfinite().tolist() == [True, False, False, False]
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    shuffled = logits[[2, 0, 3, 1]]  # order in the vocabulary does not matter
    assert top_p_filter(shuffled, 0.75).isfinite().tolist() == [False, True, False, True]


def test_samples_follow_the_temperature_scaled_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for temperature in (0.5, 1.0, 2.0):
        gen = torch.Generator().manual_seed(0)
        draws = sample_next_token(logits.repeat(40_000, 1), temperature, generator=gen).squeeze(1)
        freq = torch.bincount(draws, minlength=4).float() / draws.numel()
        want = torch.softmax(logits / temperature, dim=-1)
        assert (freq - want).abs().max() < 0.01, (temperature, freq, want)


def test_seeds_reproduce_samples(model):
    idx = _prompt(2, 4)
    torch.manual_seed(42)
    a = generate(model, idx, 30, temperature=1.0, top_k=50, top_p=0.95)
    torch.manual_seed(42)
    b = generate(model, idx, 30, temperature=1.0, top_k=50, top_p=0.95)
    torch.manual_seed(43)
    c = generate(model, idx, 30, temperature=1.0, top_k=50, top_p=0.95)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert generate(model, idx, 30, temperature=0.8, generator=g1).tolist() == \
        generate(model, idx, 30, temperature=0.8, generator=g2, use_cache=False).tolist()


def test_generation_stops_at_eos(model):
    idx = _prompt(1, 5)
    greedy = generate(model, idx, 20)[0, 5:].tolist()
    eos = greedy[3]
    stop = greedy.index(eos)  # the first time it appears
    out = generate(model, idx, 20, eos_id=eos)
    assert out[0, 5:].tolist() == greedy[: stop + 1]
    # in a batch, a finished row is padded with eos until every row is done
    both = torch.cat([idx, _prompt(1, 5, seed=9)])
    out = generate(model, both, 20, eos_id=eos)
    row0 = out[0, 5:].tolist()
    assert row0[: stop + 1] == greedy[: stop + 1] and set(row0[stop:]) == {eos}


def test_output_keeps_the_prompt_dtype_and_owns_its_memory(model):
    idx = _prompt(2, 5)
    want = generate(model, idx, 12)
    got = generate(model, idx.int(), 12)
    assert got.dtype == torch.int32 and got.tolist() == want.tolist()
    assert generate(model, idx.int(), 12, use_cache=False).tolist() == want.tolist()
    assert torch.equal(want[:, :5], idx) and want.is_contiguous()
    eos = want[0, 7].item()
    stopped = generate(model, idx, 12, eos_id=eos)
    assert stopped.is_contiguous() and stopped.untyped_storage().nbytes() == stopped.numel() * 8  # not a view


def test_tiny_temperatures_approach_greedy_instead_of_failing(model):
    idx = _prompt(2, 5)
    greedy = generate(model, idx, 12)
    for temperature in (1e-45, 5e-324, 1e-30):  # 1e-45 used to end in "probability tensor contains inf"
        assert generate(model, idx, 12, temperature=temperature, top_k=5, top_p=0.9).tolist() == greedy.tolist()
        assert generate(model, idx, 12, temperature=temperature).tolist() == greedy.tolist()
    # Exact ties stay a fair draw among the tied tokens, as in the limit of softmax(logits / T).
    logits = torch.tensor([[3.0e30, -1.0e30, 3.0e30, float("-inf")]])
    draws = sample_next_token(logits.repeat(2000, 1), 1e-45, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws.flatten(), minlength=4).tolist()
    assert counts[1] == counts[3] == 0 and 800 < counts[0] < 1200


class _Scripted(nn.Module):
    """Returns ``logits_at(step)`` for the last position; counts the steps."""

    def __init__(self, logits_at):
        super().__init__()
        self.logits_at, self.calls, self.cfg = logits_at, 0, CFG
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, idx):
        self.calls += 1
        out = torch.zeros(idx.shape[0], idx.shape[1], CFG.vocab_size)
        out[:, -1] = self.logits_at(self.calls)
        return out


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_non_finite_logits_are_an_error_naming_the_step(bad, temperature):
    def logits_at(step):
        row = torch.randn(CFG.vocab_size)
        if step >= 3:
            row[7] = bad
        return row

    with pytest.raises(ValueError, match="generate, new token 3 of 10: the model's logits are not finite.*diverged"):
        generate(_Scripted(logits_at), _prompt(), 10, temperature=temperature, use_cache=False)


def test_minus_inf_rules_tokens_out_but_a_row_of_only_minus_inf_is_an_error():
    logits = torch.full((2, 5), float("-inf"))
    logits[:, 3] = 0.0
    assert sample_next_token(logits, 1.0).flatten().tolist() == [3, 3]
    logits[1] = float("-inf")
    with pytest.raises(ValueError, match=r"sample_next_token: .*batch row\(s\) \[1\]"):
        sample_next_token(logits, 1.0)
    with pytest.raises(ValueError, match="not finite"):
        sample_next_token(torch.tensor([[0.0, float("nan")]]), 0.0)


def test_real_model_with_nan_weights(model):
    broken = GPTModel(CFG).eval()
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.trf_blocks[1].ff.layers[0].weight[0, 0] = float("nan")
    for kw in ({}, {"temperature": 0.7, "top_k": 20}):
        with pytest.raises(ValueError, match="new token 1 of 5"):
            generate(broken, _prompt(), 5, **kw)


def test_bad_sampling_inputs_are_named(model):
    with pytest.raises(TypeError, match="generator must be None or a torch.Generator"):
        generate(model, _prompt(), 2, temperature=1.0, generator=5)
    with pytest.raises(TypeError, match="use_cache must be True or False, got 'no'"):
        generate(model, _prompt(), 2, use_cache="no")
    with pytest.raises(TypeError, match="logits must be a float tensor"):
        top_k_filter([1.0, 3.0, 2.0], 2)
    with pytest.raises(TypeError, match="logits must be a float tensor"):
        top_p_filter(torch.tensor([1, 3, 2]), 0.5)
    with pytest.raises(ValueError, match=r"logits must be \[batch, vocab\].*logits\[:, -1, :\]"):
        sample_next_token(torch.randn(1, 2, 5), 1.0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_small_id_dtypes_are_refused(model, dtype):
    with pytest.raises(TypeError, match=rf"got {dtype}.*idx\.long\(\)"):
        generate(model, _prompt().to(dtype), 3)


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-0.1), "temperature"), (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(eos_id=CFG.vocab_size), "eos_id"),
    (dict(context_size=17), "context_size"), (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_arguments_are_clear_value_errors(model, kwargs, name):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=name):
        generate(model, _prompt(), **kwargs)


def test_models_without_a_cache_and_the_training_mode(model):
    class Wrapped(nn.Module):  # any module mapping ids to logits; its forward takes no kv_cache
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.cfg = inner.cfg

        def forward(self, idx):
            return self.inner(idx)

    idx = _prompt()
    assert generate(Wrapped(model), idx, 25).tolist() == generate(model, idx, 25).tolist()
    model.train()
    generate(model, idx, 2)
    assert model.training
    model.eval()


def test_a_cache_of_another_model_and_a_bad_advance_are_named():
    cfg = GPTConfig(vocab_size=61, context_length=16, emb_dim=32, n_heads=4, n_layers=3, drop_rate=0.0, qkv_bias=False)
    deep, shallow = GPTModel(cfg).eval(), GPTModel(cfg.replace(n_layers=1)).eval()
    cache, _ = prefill(shallow, [[1, 2, 3]])
    with pytest.raises(ValueError, match="made for a model of 1 layers and this one has 3"):   # an IndexError before
        decode_step(deep, cache, torch.tensor([4]))
    for bad in (-5, 100, 1.5, True):
        with pytest.raises(ValueError, match="num_tokens must be an integer in"):
            cache.advance(bad)
    assert cache.lengths.tolist() == [3]


def test_numpy_numbers_are_numbers_for_sampling():
    import numpy as np

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=61, context_length=16, emb_dim=32, n_heads=4, n_layers=1,
                               drop_rate=0.0, qkv_bias=False)).eval()
    idx = torch.tensor([[1, 2, 3]])
    want = generate(model, idx, 4, temperature=0.7, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(3))
    got = generate(model, idx, 4, temperature=np.float32(0.7), top_k=np.int64(5), top_p=np.float64(0.9),
                   eos_id=np.int64(60), generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want)
    for kwargs, match in (({"temperature": True}, "temperature"), ({"top_k": 2.0}, "top_k"),
                          ({"temperature": float("nan")}, "temperature must be a finite number >= 0")):
        with pytest.raises(ValueError, match=match):
            generate(model, idx, 2, **kwargs)


def test_logits_without_a_vocabulary_axis_and_a_string_switch_are_named():
    import numpy as np

    from course_lib.inference import few_rows_route

    for bad in (torch.tensor(1.0), torch.zeros(1, 0)):
        with pytest.raises(ValueError, match="one score per token"):
            top_k_filter(bad, 1)
        with pytest.raises(ValueError, match="one score per token"):
            sample_next_token(bad)
    with pytest.raises(TypeError, match="enabled must be True or False"):     # "no" left the route on
        with few_rows_route("no"):
            pass
    cache = KVCache(1, 3, 2, 4, 8)
    assert cache.first_rows(np.int64(2)).batch_size == 2
