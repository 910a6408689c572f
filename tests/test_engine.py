"""The batching engine (course_lib.engine) against inference.generate, tiktoken and step 9's adapters,
on tiny random models; and KVCache.first_rows, the view it decodes through."""

from __future__ import annotations

import asyncio
import copy
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import course_lib.engine as engine_mod
from course_lib.config import GPTConfig, get_config
from course_lib.engine import (Completion, Engine, EngineClosed, EngineError, PromptTooLong, RequestFailed,
                               SamplingParams, UnknownModel, _Detokenizer)
from course_lib.inference import KVCache, decode_step, generate, prefill
from course_lib.lora import add_lora, load_adapter, lora_layers, save_adapter, set_adapter
from course_lib.model import GPTModel

LONG = GPTConfig(vocab_size=50257, context_length=256, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
                 qkv_bias=False)
GREEDY = dict(temperature=0, stop_token_ids=())


@pytest.fixture(scope="module")
def enc():
    """tiktoken's GPT-2 encoding (the reference detokenizer), built offline from the course's files."""
    from course_lib.tokenizers import tiktoken_gpt2
    try:
        return tiktoken_gpt2()
    except Exception as err:  # no data mirror
        pytest.skip(f"GPT-2's BPE files are not available offline: {err}")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTModel(get_config("gpt-tiny")).eval()      # context 64


@pytest.fixture(scope="module")
def long_model():
    torch.manual_seed(1)
    return GPTModel(LONG).eval()


@pytest.fixture(autouse=True)
def _no_thread_leaks():
    yield
    left = [t for t in threading.enumerate() if t.name.startswith("engine-")]
    assert not left, f"engine threads left running: {left}"


def _prompt(n, seed=0):
    return torch.randint(0, 50257, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _ref(model, ids, n, **kw):
    """The tokens inference.generate adds to ids (greedy unless kw says otherwise)."""
    return generate(model, torch.tensor([ids]), n, **kw)[0, len(ids):].tolist()


class Stepped(Engine):
    """An engine whose decode steps wait for the test's go-ahead (deterministic interleavings)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.gate = threading.Semaphore(0)

    def _decode(self):
        self.gate.acquire()
        super()._decode()

    def shutdown(self):
        self.gate.release(10_000)
        super().shutdown()


# --------------------------------------------------------------------------- #
# Greedy output and batching
# --------------------------------------------------------------------------- #
def test_greedy_alone_equals_generate(model, enc):
    with Engine(copy.deepcopy(model), enc) as eng:
        for n, new in ((1, 12), (5, 20), (17, 9), (40, 23)):
            ids = _prompt(n, seed=n)
            c = eng.generate(ids, SamplingParams(max_tokens=new, **GREEDY))
            want = _ref(model, ids, new)
            assert c.token_ids == want
            assert c.text == enc.decode(want)
            assert (c.finish_reason, c.prompt_tokens, c.completion_tokens) == ("length", n, new)
        text = "The quick brown fox"
        c = eng.generate(text, SamplingParams(max_tokens=8, **GREEDY))
        assert c.token_ids == _ref(model, enc.encode(text), 8) and c.prompt_tokens == len(enc.encode(text))


def test_32_concurrent_requests_unmixed(model, enc):
    jobs = [(_prompt(1 + (7 * i) % 30, seed=100 + i), 4 + (5 * i) % 17) for i in range(32)]
    want = [_ref(model, ids, new) for ids, new in jobs]
    with Engine(copy.deepcopy(model), enc, max_batch=8) as eng:
        with ThreadPoolExecutor(8) as pool:        # submitted from many threads at once
            got = list(pool.map(lambda job: eng.generate(job[0], SamplingParams(max_tokens=job[1], **GREEDY)),
                                jobs))
        stats = eng.stats()
    assert [c.token_ids for c in got] == want
    assert [c.text for c in got] == [enc.decode(w) for w in want]
    total = sum(new for _, new in jobs)
    assert stats["tokens_generated"] == total and stats["requests_finished"] == 32
    assert stats["running"] == stats["waiting"] == 0
    assert stats["steps"] < total - 32 - 20      # one forward pass served several rows (alone: total - 32)


def test_request_joins_mid_batch(long_model, enc):
    a_ids, b_ids = _prompt(9, seed=1), _prompt(3, seed=2)
    with Stepped(copy.deepcopy(long_model), enc) as eng:
        a = eng.submit(a_ids, SamplingParams(max_tokens=40, **GREEDY))
        it = iter(a)
        eng.gate.release(5)
        first = [next(it) for _ in range(6)]            # the prefill's token and 5 decode steps
        b = eng.submit(b_ids, SamplingParams(max_tokens=10, **GREEDY))
        eng.gate.release(10_000)
        rest = list(it)
        cb, ca = b.result(), a.result()
        steps = eng.stats()["steps"]
    assert ca.token_ids == _ref(long_model, a_ids, 40) and cb.token_ids == _ref(long_model, b_ids, 10)
    assert [t for d in first + rest for t in d.token_ids] == ca.token_ids
    assert steps == 39                                   # b's 9 decode steps rode along with a's


def test_length_and_context_full(model, enc):
    with Engine(copy.deepcopy(model), enc) as eng:
        ids = _prompt(60, seed=3)                        # context 64: room for 4 new tokens
        c = eng.generate(ids, SamplingParams(max_tokens=16, **GREEDY))
        assert (c.finish_reason, c.completion_tokens) == ("length", 4)
        assert c.token_ids == _ref(model, ids, 4)
        c = eng.generate(_prompt(63, seed=4), SamplingParams(max_tokens=5, **GREEDY))
        assert (c.finish_reason, c.completion_tokens) == ("length", 1)
        with pytest.raises(PromptTooLong, match="context length is 64") as err:
            eng.submit(_prompt(64), SamplingParams())
        assert (err.value.prompt_tokens, err.value.limit) == (64, 64) and isinstance(err.value, ValueError)
        with pytest.raises(EngineError, match="no tokens"):
            eng.submit([])


# --------------------------------------------------------------------------- #
# Stop strings, stop tokens, detokenizing
# --------------------------------------------------------------------------- #
def test_stop_strings_excluded_and_earliest_wins(model, enc):
    ids = _prompt(4, seed=5)
    want = _ref(model, ids, 40)
    full = enc.decode(want)
    late, early = full[25:29], full[12:15]
    cut = min(full.find(late), full.find(early))
    with Engine(copy.deepcopy(model), enc) as eng:
        h = eng.submit(ids, SamplingParams(max_tokens=40, stop=[late, early], **GREEDY))
        deltas = list(h)
        c = h.result()
    assert c.text == full[:cut] and c.finish_reason == "stop" == deltas[-1].finish_reason
    assert "".join(d.text for d in deltas) == c.text                # never more than the final text
    assert c.token_ids == want[:len(c.token_ids)] and len(c.token_ids) < 40
    first = early if full.find(early) == cut else late
    assert enc.decode(c.token_ids).find(first) == cut and first not in enc.decode(c.token_ids[:-1])


def test_stop_token_ends_and_is_left_out(model, enc):
    ids = _prompt(6, seed=6)
    want = _ref(model, ids, 30)
    stop = want[7]
    k = want.index(stop)
    with Engine(copy.deepcopy(model), enc) as eng:
        c = eng.generate(ids, SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop]))
        h = eng.submit(ids, SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop], logprobs=1))
        deltas = list(h)
    assert c.token_ids == want[:k] and c.text == enc.decode(want[:k])
    # log-probabilities leave the stop token out, as token_ids do
    assert [e.token_id for e in h.result().logprobs] == h.result().token_ids == want[:k]
    assert deltas[-1].finish_reason == "stop" and deltas[-1].logprobs == [] == deltas[-1].token_ids
    assert (c.finish_reason, c.completion_tokens) == ("stop", k + 1)
    assert SamplingParams().stop_token_ids == (enc.eot_token,) == (50256,)


def test_detokenizer_holds_back_partial_utf8_and_stop_prefixes(enc):
    text = "Grüße, 日本語 🙂 and 🙃 END tail"
    ids = enc.encode(text)
    d = _Detokenizer(enc, ("END",))
    out, held, stopped = [], 0, False
    for t in ids:
        piece, stopped = d.add(t)
        out.append(piece)
        held += piece == ""
        if stopped:
            break
    assert stopped and "".join(out) == "Grüße, 日本語 🙂 and 🙃 " == d.text
    assert not any("\ufffd" in p for p in out) and held > 0          # partial characters were held
    d = _Detokenizer(enc, ("ENDX", "zz"))
    pieces = [d.add(t)[0] for t in ids]
    assert "".join(pieces) + d.flush() == enc.decode(ids) == text

    class DecodeOnly:                                               # a tokenizer without decode_bytes
        decode = staticmethod(enc.decode)

    d = _Detokenizer(DecodeOnly(), ())
    pieces = [d.add(t)[0] for t in ids]
    assert "".join(pieces) + d.flush() == text and not any("\ufffd" in p for p in pieces)
    ids = enc.encode("one two three four")                          # 'one', ' two', ' three', ' four'
    for stop, want in ((("three five",), [("one", False), (" two", False), (" ", False), ("three four", False)]),
                       (("xyz", "three f"), [("one", False), (" two", False), (" ", False), ("", True)]),
                       (("wo th",), [("one", False), (" t", False), ("", True)])):
        d = _Detokenizer(enc, stop)
        assert [d.add(t) for t in ids[:len(want)]] == want            # 'three' held: it may start a stop


# --------------------------------------------------------------------------- #
# Sampling settings
# --------------------------------------------------------------------------- #
def test_seed_reproducible_alone_and_in_a_batch(model, enc):
    ids = _prompt(5, seed=7)
    params = SamplingParams(max_tokens=20, temperature=0.9, top_k=200, top_p=0.95, seed=123, stop_token_ids=())
    want = _ref(model, ids, 20, temperature=0.9, top_k=200, top_p=0.95, generator=torch.Generator().manual_seed(123))
    with Engine(copy.deepcopy(model), enc) as eng:
        alone = eng.generate(ids, params)
        others = [eng.submit(_prompt(3 + i, seed=i), SamplingParams(max_tokens=15, temperature=1.0, seed=i))
                  for i in range(5)]
        again = eng.submit(ids, params)
        other_seed = eng.submit(ids, SamplingParams(max_tokens=20, temperature=0.9, top_k=200, top_p=0.95, seed=7,
                                                    stop_token_ids=()))
        assert again.result() == alone and alone.token_ids == want
        assert other_seed.result().token_ids != want
        for h in others:
            h.result()


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", 2.0), ("temperature", -0.1), ("temperature", 2.5), ("temperature", float("nan")),
    ("temperature", "1"), ("top_p", 0), ("top_p", 1.5), ("top_k", 0), ("top_k", 2.5), ("stop", ["a"] * 5),
    ("stop", [""]), ("stop", [1]), ("seed", 1.5), ("seed", 2**64), ("stop_token_ids", [-1]), ("stop_token_ids", 5),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", True), ("logprobs", 2.0), ("prompt_logprobs", 21),
    ("prompt_logprobs", False), ("presence_penalty", 2.5), ("frequency_penalty", float("nan")),
    ("frequency_penalty", "1"), ("logit_bias", {-1: 1.0}), ("logit_bias", {5: 101}), ("logit_bias", {"5": 1}),
    ("logit_bias", [5]), ("logit_bias", ((5, 1.0), (5, 2.0))), ("max_tokens", 0)])
def test_sampling_params_validated(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sampling_params_normalised():
    p = SamplingParams(stop="###", stop_token_ids=[1, 2], temperature=1)
    assert p.stop == ("###",) and p.stop_token_ids == (1, 2) and p.temperature == 1.0
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def _reference_logprobs(model, ids, new):
    """log-softmax of the model's logits at each generated position: one full forward pass, no cache."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + new]))[0, len(ids) - 1:len(ids) + len(new) - 1]   # [len(new), V]
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.5, top_k=5, seed=3)])
def test_logprobs_are_the_models_own_and_follow_the_tokens(model, enc, sampling):
    ids = _prompt(5, seed=8)
    with Engine(copy.deepcopy(model), enc) as eng:
        plain = eng.generate(ids, SamplingParams(max_tokens=12, stop_token_ids=(), **sampling))
        h = eng.submit(ids, SamplingParams(max_tokens=12, stop_token_ids=(), logprobs=3, **sampling))
        deltas = list(h)
        c = h.result()
        none = eng.generate(ids, SamplingParams(max_tokens=12, stop_token_ids=(), logprobs=0, **sampling))
    assert c.token_ids == plain.token_ids and plain.logprobs is None           # asking changes no token
    ref = _reference_logprobs(model, ids, c.token_ids)
    assert [e.token_id for e in c.logprobs] == c.token_ids
    for k, entry in enumerate(c.logprobs):
        assert entry.logprob == pytest.approx(float(ref[k, entry.token_id]), abs=1e-4)
        top = ref[k].topk(3)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    if sampling["temperature"] == 0:
        assert all(e.top[0][0] == e.token_id for e in c.logprobs)             # greedy takes the most likely
    # every Delta carries its own tokens' entries; together they are the Completion's
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)
    assert [e for d in deltas for e in d.logprobs] == c.logprobs
    assert [e.top for e in none.logprobs] == [[]] * 12 and [e.token_id for e in none.logprobs] == c.token_ids


def test_prompt_logprobs_are_the_models_given_the_tokens_before(model, enc, tmp_path):
    ids = _prompt(9, seed=4)
    ref = _reference_logprobs(model, ids[:1], ids[1:])         # position t predicts token t + 1
    tuned = copy.deepcopy(model)
    add_lora(tuned, rank=4, alpha=8, name="a")
    with torch.no_grad():
        for layer in lora_layers(tuned).values():
            layer.lora_B["a"].normal_(0, 0.3)
    folder = save_adapter(tuned, tmp_path / "a", "a")
    set_adapter(tuned, "a")
    ref_a = _reference_logprobs(tuned.eval(), ids[:1], ids[1:])
    with Engine(copy.deepcopy(model), enc, adapters={"a": folder}) as eng:
        plain = eng.generate(ids, SamplingParams(max_tokens=5, **GREEDY))
        # submitted together: the prompt passes and the batch's prefill each use their own adapter
        hs = [eng.submit(ids, SamplingParams(max_tokens=5, prompt_logprobs=2, **GREEDY), model=m)
              for m in (None, "a", None)]
        got = [h.result() for h in hs]
    assert got[0].token_ids == plain.token_ids == got[2].token_ids and got[0].logprobs is None
    for c, r in ((got[0], ref), (got[1], ref_a), (got[2], ref)):
        assert c.prompt_logprobs[0] is None and len(c.prompt_logprobs) == len(ids)
        assert [e.token_id for e in c.prompt_logprobs[1:]] == ids[1:]
        for k, e in enumerate(c.prompt_logprobs[1:]):
            assert e.logprob == pytest.approx(float(r[k, ids[k + 1]]), abs=1e-4)
            assert [t for t, _ in e.top] == r[k].topk(2).indices.tolist()
    assert hs[0].prompt_logprobs == got[0].prompt_logprobs and plain.prompt_logprobs is None


def test_logprobs_of_rows_decoded_together_equal_each_alone(model, enc):
    """Rows asking for different numbers of alternatives (and none) share a step's scoring pass."""
    asks = [(_prompt(4, seed=s), k) for s, k in ((1, 1), (2, 4), (3, None), (4, 0))]
    with Engine(copy.deepcopy(model), enc) as eng:
        alone = [eng.generate(ids, SamplingParams(max_tokens=6, logprobs=k, **GREEDY)) for ids, k in asks]
        hs = [eng.submit(ids, SamplingParams(max_tokens=6, logprobs=k, **GREEDY)) for ids, k in asks]
        together = [h.result() for h in hs]
    for a, t, (_, k) in zip(alone, together, asks):
        assert t.token_ids == a.token_ids
        if k is None:
            assert t.logprobs is None
            continue
        assert [len(e.top) for e in t.logprobs] == [k] * 6
        assert [e.token_id for e in t.logprobs] == [e.token_id for e in a.logprobs]
        assert [e.logprob for e in t.logprobs] == pytest.approx([e.logprob for e in a.logprobs], abs=1e-5)
        assert [[i for i, _ in e.top] for e in t.logprobs] == [[i for i, _ in e.top] for e in a.logprobs]


def _penalized_reference(model, ids, n, presence=0.0, frequency=0.0, bias=None):
    """Greedy decoding by hand with OpenAI's penalties and logit bias: a full forward pass per token."""
    out, counts = [], {}
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids + out]))[0, -1].float()
        for t, b in (bias or {}).items():
            logits[t] += b
        for t, c in counts.items():
            logits[t] -= frequency * c + presence
        token = int(logits.argmax())
        out.append(token)
        counts[token] = counts.get(token, 0) + 1
    return out


def test_penalties_and_logit_bias_equal_a_hand_written_loop(enc):
    torch.manual_seed(0)
    model = GPTModel(get_config("gpt-tiny"), tie_weights=True).eval()   # tied and random: it says one token forever
    ids = _prompt(5, seed=12)
    plain = _ref(model, ids, 24)
    assert len(set(plain)) == 1
    settings = [dict(frequency=1.5), dict(presence=1.0), dict(presence=0.5, frequency=0.5, bias={plain[0]: -100}),
                dict(frequency=-0.5, bias={11: 3.0})]
    with Engine(copy.deepcopy(model), enc) as eng:
        # all together in one batch, with a plain row beside them
        hs = [eng.submit(ids, SamplingParams(max_tokens=24, presence_penalty=k.get("presence", 0.0),
                                             frequency_penalty=k.get("frequency", 0.0),
                                             logit_bias=k.get("bias", {}), **GREEDY)) for k in settings]
        h_plain = eng.submit(ids, SamplingParams(max_tokens=24, **GREEDY))
        got = [h.result().token_ids for h in hs]
        forced = eng.generate(ids, SamplingParams(max_tokens=6, temperature=1.0, seed=1, logit_bias={42: 100.0},
                                                  stop_token_ids=()))
        banned = eng.generate(ids, SamplingParams(max_tokens=40, temperature=2.0, seed=1, stop_token_ids=(),
                                                  logit_bias={t: -100 for t in plain}))
        with pytest.raises(EngineError, match="token id 50257"):
            eng.submit(ids, SamplingParams(logit_bias={50257: 1.0}))
    assert h_plain.result().token_ids == plain
    for k, tokens in zip(settings, got):
        assert tokens == _penalized_reference(model, ids, 24, **k), k
    assert got[0] != plain and len(set(got[0])) > len(set(plain))
    assert got[2][0] != plain[0]
    assert forced.token_ids == [42] * 6
    assert not set(banned.token_ids) & set(plain)


def test_scoring_alone_decodes_nothing_and_one_pass_serves_every_choice(model, enc, monkeypatch):
    calls = []
    plain = engine_mod._prompt_scores
    monkeypatch.setattr(engine_mod, "_prompt_scores", lambda *a: calls.append(1) or plain(*a))
    full = _prompt(64, seed=9)                                   # the whole context of gpt-tiny
    with Engine(copy.deepcopy(model), enc) as eng:
        scored = eng.generate(full, SamplingParams(max_tokens=0, prompt_logprobs=1))
        assert (eng.stats()["steps"], eng.stats()["prefills"], len(calls)) == (0, 0, 1)
        with pytest.raises(PromptTooLong):
            eng.submit(full, SamplingParams(max_tokens=1, prompt_logprobs=1))
        with eng._model_lock:                  # the engine waits: the three are admitted together
            hs = [eng.submit(full[:20], SamplingParams(max_tokens=2, prompt_logprobs=0, **GREEDY)) for _ in range(3)]
        same = [h.result() for h in hs]
    assert (scored.token_ids, scored.completion_tokens, scored.finish_reason, scored.text) == ([], 0, "length", "")
    ref = _reference_logprobs(model, full[:1], full[1:])
    assert [e.logprob for e in scored.prompt_logprobs[1:]] == pytest.approx(
        [float(ref[k, t]) for k, t in enumerate(full[1:])], abs=1e-4)
    assert len(calls) == 2 and same[0].prompt_logprobs == same[1].prompt_logprobs == same[2].prompt_logprobs


# --------------------------------------------------------------------------- #
# Adapters, names, errors
# --------------------------------------------------------------------------- #
def test_adapters_per_row_equal_each_alone(model, enc, tmp_path):
    folders = {}
    for i, (name, targets) in enumerate((("a", ("attention",)), ("b", ("attention", "ff")))):
        m = copy.deepcopy(model)
        add_lora(m, rank=4, alpha=8, targets=targets, name=name)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for layer in lora_layers(m).values():
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.5)
        folders[name] = save_adapter(m, tmp_path / name, name=name)
    ref = copy.deepcopy(model)
    for name, folder in folders.items():
        load_adapter(ref, folder, name)
    jobs = [(_prompt(2 + 3 * i, seed=20 + i), [None, "a", "b"][i % 3]) for i in range(9)]
    want = []
    for ids, name in jobs:
        set_adapter(ref, name)
        want.append(_ref(ref, ids, 12))
    assert want[1] != _ref(model, jobs[1][0], 12) and want[2] != _ref(model, jobs[2][0], 12)  # adapters matter
    with Engine(copy.deepcopy(model), enc, name="tiny", adapters={"a": folders["a"]}, max_batch=4) as eng:
        eng.generate([1, 2], SamplingParams(max_tokens=2))
        eng.load_adapter("b", folders["b"])               # while the thread runs
        assert eng.models() == ["tiny", "a", "b"]
        handles = [eng.submit(ids, SamplingParams(max_tokens=12, **GREEDY), model=name or "tiny")
                   for ids, name in jobs]
        got = [h.result().token_ids for h in handles]
        assert [h.model for h in handles] == [name or "tiny" for _, name in jobs]
        with pytest.raises(ValueError, match="taken"):
            eng.load_adapter("a", folders["a"])
    assert got == want


def test_unknown_model(model, enc):
    with Engine(copy.deepcopy(model), enc, name="mine") as eng:
        with pytest.raises(UnknownModel, match="'gpt-4'") as err:
            eng.submit("hi", model="gpt-4")
        assert err.value.name == "gpt-4" and err.value.available == ["mine"] == eng.models()
        assert isinstance(err.value, EngineError) and isinstance(err.value, ValueError)
        assert eng.generate("hi", SamplingParams(max_tokens=2), model="mine").completion_tokens >= 1
    with pytest.raises(TypeError, match="GPTModel"):
        Engine(torch.nn.Linear(2, 2), enc)
    with pytest.raises(ValueError, match="max_batch"):
        Engine(model, enc, max_batch=0)


# --------------------------------------------------------------------------- #
# Cancel, failures, shutdown, asyncio
# --------------------------------------------------------------------------- #
def test_cancel_frees_the_row_and_others_finish(long_model, enc):
    a_ids, b_ids = _prompt(4, seed=8), _prompt(6, seed=9)
    with Stepped(copy.deepcopy(long_model), enc, max_batch=2) as eng:
        a = eng.submit(a_ids, SamplingParams(max_tokens=100, **GREEDY))
        b = eng.submit(b_ids, SamplingParams(max_tokens=30, **GREEDY))
        c = eng.submit(_prompt(5), SamplingParams(max_tokens=30, **GREEDY))      # waits: 2 rows
        eng.gate.release(3)
        deltas = iter(a)
        for _ in range(4):
            next(deltas)
        assert eng.stats()["running"] == 2 and eng.stats()["waiting"] == 1
        c.cancel()                                          # waiting: ends at once
        assert c.result(timeout=5) == Completion("", [], "cancelled", 5, 0)
        a.cancel()
        eng.gate.release(1)                                 # the next token boundary
        ca = a.result(timeout=10)
        assert ca.finish_reason == "cancelled" and 4 <= ca.completion_tokens < 100
        assert ca.token_ids == _ref(long_model, a_ids, ca.completion_tokens)
        stats = eng.stats()
        assert (stats["running"], stats["waiting"], stats["requests_cancelled"]) == (1, 0, 2)
        eng.gate.release(10_000)
        assert b.result().token_ids == _ref(long_model, b_ids, 30)
        h = eng.submit(a_ids, SamplingParams(max_tokens=50, **GREEDY))
        for _ in h:                                          # leaving the iterator cancels
            break
        assert h.result(timeout=10).finish_reason == "cancelled"


def test_injected_failures_do_not_kill_the_engine(model, enc, monkeypatch):
    real = engine_mod.sample_next_token

    def flaky(logits, temperature, *args):
        if temperature == 0.5:
            raise RuntimeError("boom")
        return real(logits, temperature, *args)

    monkeypatch.setattr(engine_mod, "sample_next_token", flaky)
    ids = [_prompt(3 + i, seed=30 + i) for i in range(3)]
    with Engine(copy.deepcopy(model), enc) as eng:
        good = [eng.submit(p, SamplingParams(max_tokens=10, **GREEDY)) for p in ids]
        bad = eng.submit(ids[0], SamplingParams(max_tokens=10, temperature=0.5))
        with pytest.raises(RequestFailed, match="boom") as err:
            list(bad)
        assert isinstance(err.value.__cause__, RuntimeError)
        with pytest.raises(RequestFailed):
            bad.result()
        assert [h.result().token_ids for h in good] == [_ref(model, p, 10) for p in ids]
        assert eng.stats()["requests_failed"] == 1
    with Stepped(copy.deepcopy(model), enc) as eng:
        forward = eng.model.forward

        def broken(idx, kv_cache=None):                     # the batched forward itself fails, once
            if idx.shape[0] == 2 and not broken.done:
                broken.done = True
                raise RuntimeError("device lost")
            return forward(idx, kv_cache=kv_cache)

        broken.done = False
        monkeypatch.setattr(eng.model, "forward", broken)
        hs = [eng.submit(p, SamplingParams(max_tokens=10, **GREEDY)) for p in ids[:2]]
        eng.gate.release(10_000)                            # both rows are in before the 2nd step
        for h in hs:
            with pytest.raises(RequestFailed, match="device lost"):
                h.result(timeout=10)
        assert eng.generate(ids[2], SamplingParams(max_tokens=10, **GREEDY)).token_ids == _ref(model, ids[2], 10)
        assert eng.stats()["requests_failed"] == 2 and eng.stats()["running"] == 0


def test_many_one_token_requests_and_cancel_races_leave_nothing_behind(model, enc):
    """64 requests of one token through 4 rows, then 60 cancelled at random moments (before the queue,
    in it, in a row, after the end): each ends once, the counters add up, no row or queue entry is left."""
    with Engine(copy.deepcopy(model), enc, max_batch=4) as eng:
        ids = [_prompt(3, seed=i) for i in range(64)]
        done = [eng.submit(p, SamplingParams(max_tokens=1, **GREEDY)) for p in ids]
        for h, p in zip(done, ids):
            c = h.result(timeout=20)
            assert (c.finish_reason, c.completion_tokens, c.token_ids) == ("length", 1, _ref(model, p, 1))
        pause = random.Random(0)
        raced = []
        for i in range(60):
            h = eng.submit(ids[i], SamplingParams(max_tokens=40, **GREEDY))
            time.sleep(pause.random() * 0.004 if i % 3 else 0)
            h.cancel()
            raced.append(h)
        ends = [h.result(timeout=20).finish_reason for h in raced]
        assert set(ends) <= {"cancelled", "length"}
        stats = eng.stats()
        assert (stats["running"], stats["waiting"]) == (0, 0)
        assert stats["requests_finished"] == 64 + ends.count("length")
        assert stats["requests_cancelled"] == ends.count("cancelled")


def test_shutdown_ends_pending_requests(long_model, enc):
    eng = Engine(copy.deepcopy(long_model), enc, max_batch=1)
    handles = [eng.submit(_prompt(4, seed=i), SamplingParams(max_tokens=200, **GREEDY)) for i in range(3)]
    eng.shutdown()
    assert not eng._thread.is_alive()
    for h in handles[1:]:
        with pytest.raises(RequestFailed, match="shut down"):
            h.result(timeout=5)
    assert eng.closed
    with pytest.raises(EngineClosed, match="shut down"):     # a RuntimeError, which the server makes a 503
        eng.submit([1, 2])
    eng.shutdown()                                           # twice is fine


def test_async_iteration_does_not_block_the_event_loop(model, enc):
    ids = [_prompt(4, seed=40), _prompt(7, seed=41)]
    order = []

    async def main(eng):
        async def release():
            await asyncio.sleep(0.05)
            order.append("released by the event loop")
            eng.gate.release(10_000)

        async def collect(h):
            out = []
            async for d in h:
                if len(out) == 1:                               # the first after the prefill's
                    order.append("first decode delta")
                out.append(d)
            return out

        hs = [eng.submit(p, SamplingParams(max_tokens=8, **GREEDY)) for p in ids]
        return await asyncio.wait_for(asyncio.gather(release(), *(collect(h) for h in hs)), timeout=20)

    with Stepped(copy.deepcopy(model), enc) as eng:
        timer = threading.Timer(10, eng.gate.release, [10_000])   # if the loop were blocked
        timer.start()
        _, *streams = asyncio.run(main(eng))
        timer.cancel()
    assert order[0] == "released by the event loop"
    for p, deltas in zip(ids, streams):
        assert [t for d in deltas for t in d.token_ids] == _ref(model, p, 8)
        assert "".join(d.text for d in deltas) == enc.decode(_ref(model, p, 8))
        assert [d.finish_reason for d in deltas] == [None] * 7 + ["length"]


# --------------------------------------------------------------------------- #
# KVCache.first_rows
# --------------------------------------------------------------------------- #
def test_kvcache_first_rows_view_decodes_like_a_batch(model):
    p1, p2 = _prompt(5, seed=50), _prompt(9, seed=51)
    with torch.no_grad():
        ref_cache, _ = prefill(model, [p1, p2], max_len=20)
        want = decode_step(model, ref_cache, torch.tensor([[3], [4]]))             # [2, V]
        big = KVCache.for_model(model, 4)
        for row, p in enumerate((p1, p2)):
            one, _ = prefill(model, [p])
            big.load_row(row, one)
        view = big.first_rows(2)
        assert view.keys.data_ptr() == big.keys.data_ptr() and view.batch_size == 2
        got = decode_step(model, view, torch.tensor([[3], [4]]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert big.lengths.tolist() == [6, 10, 0, 0]                                  # advanced in place
    torch.testing.assert_close(big.keys[:, 1, :, :10], ref_cache.keys[:, 1, :, :10])
    assert big.first_rows(1).pos == 6
    for bad in (0, 5, 1.0, True):
        with pytest.raises(ValueError, match="n must be"):
            big.first_rows(bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_fail_that_request_and_the_engine_goes_on(model, enc, bad):
    """One NaN or infinity among a row's logits fails its request (a diverged model), not the engine."""
    p = _prompt(5, seed=3)
    poison = {"on": True}

    def hook(module, args, out):
        if poison["on"]:
            out = out.clone()
            out[..., 7] = bad
        return out

    with Engine(copy.deepcopy(model), enc) as eng:
        eng.model.out_head.register_forward_hook(hook)
        with pytest.raises(RequestFailed, match="not finite"):
            eng.generate(p, SamplingParams(max_tokens=5, **GREEDY))
        poison["on"] = False
        assert eng.generate(p, SamplingParams(max_tokens=5, **GREEDY)).token_ids == _ref(model, p, 5)


def test_a_step_wakes_each_event_loop_once_not_once_per_stream(model, enc):
    """The asyncio readers of one event loop are woken by one ``call_soon_threadsafe`` per decode
    step (each call writes to the loop's socket), not one per stream and token; every stream still
    gets all its tokens."""
    ids = [_prompt(3 + i, seed=60 + i) for i in range(6)]
    calls = []

    async def main(eng):
        loop = asyncio.get_running_loop()
        plain = loop.call_soon_threadsafe

        def counted(callback, *args, **kw):
            calls.append(threading.current_thread().name)
            return plain(callback, *args, **kw)

        loop.call_soon_threadsafe = counted

        async def collect(h):
            return [d async for d in h]

        async def pace():                   # a step at a time, once the readers have caught up
            while not all(h.done for h in hs):
                eng.gate.release()
                await asyncio.sleep(0.005)

        hs = [eng.submit(p, SamplingParams(max_tokens=12, **GREEDY)) for p in ids]
        try:
            *streams, _ = await asyncio.wait_for(asyncio.gather(*(collect(h) for h in hs), pace()), timeout=20)
            return streams
        finally:
            del loop.call_soon_threadsafe

    with Stepped(copy.deepcopy(model), enc) as eng:
        streams = asyncio.run(main(eng))
        stats = eng.stats()
    for p, deltas in zip(ids, streams):
        assert [t for d in deltas for t in d.token_ids] == _ref(model, p, 12)
    from_engine = [c for c in calls if c.startswith("engine")]
    # one per step and prefill, plus each request's last Delta (sent on its own after its row is freed);
    # one per stream and token would be about 6 x 12 = 72
    assert 0 < len(from_engine) <= stats["steps"] + stats["prefills"] + len(ids), (len(from_engine), stats)


# --------------------------------------------------------------------------- #
# Requests that wait together are prefilled together
# --------------------------------------------------------------------------- #
def _random_adapter(model, folder, name, seed):
    m = copy.deepcopy(model)
    add_lora(m, rank=4, alpha=8, name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(m).values():
            layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.5)
    return save_adapter(m, folder, name=name)


def test_waiting_requests_are_prefilled_in_one_pass(model, enc, tmp_path):
    """Prompts of different lengths on different adapters, queued while the model is busy: one
    prefill pass (right-padded, cropped), and each request's tokens equal ``generate``'s alone."""
    folder = _random_adapter(model, tmp_path / "a", "a", seed=3)
    ref = copy.deepcopy(model)
    load_adapter(ref, folder, "a")
    jobs = [(_prompt(n, seed=40 + n), name) for n, name in ((5, None), (9, "a"), (2, "a"), (7, None), (1, "a"))]
    want = []
    for ids, name in jobs:
        set_adapter(ref, name)
        want.append(_ref(ref, ids, 8))
    with Engine(copy.deepcopy(model), enc, name="tiny", adapters={"a": folder}, max_batch=8) as eng:
        with eng._model_lock:                               # the thread waits: every request queues
            handles = [eng.submit(ids, SamplingParams(max_tokens=8, **GREEDY), model=name or "tiny")
                       for ids, name in jobs]
        got = [h.result(timeout=30).token_ids for h in handles]
        assert eng.stats()["prefills"] == 1
    assert got == want


def test_prefill_batches_keep_to_max_prefill_tokens(model, enc):
    lengths = (5, 7, 3, 9, 2, 4, 30)     # 20 positions a pass: [5, 7] [3, 9] [2, 4], and 30 alone
    prompts = [_prompt(n, seed=60 + n) for n in lengths]
    with Engine(copy.deepcopy(model), enc, max_batch=16, max_prefill_tokens=20) as eng:
        with eng._model_lock:
            handles = [eng.submit(p, SamplingParams(max_tokens=4, **GREEDY)) for p in prompts]
        got = [h.result(timeout=30).token_ids for h in handles]
        assert eng.stats()["prefills"] == 4
    assert got == [_ref(model, p, 4) for p in prompts]
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        Engine(model, enc, max_prefill_tokens=0)


def test_a_failed_prefill_pass_fails_only_the_request_at_fault(model, enc, monkeypatch):
    real = engine_mod._prefill_last
    poison = _prompt(6, seed=99)

    def picky(m, prompts):
        if poison in prompts:
            raise RuntimeError("bad prompt")
        return real(m, prompts)

    monkeypatch.setattr(engine_mod, "_prefill_last", picky)
    prompts = [_prompt(3 + i, seed=70 + i) for i in range(3)]
    with Engine(copy.deepcopy(model), enc) as eng:
        with eng._model_lock:
            good = [eng.submit(p, SamplingParams(max_tokens=6, **GREEDY)) for p in prompts[:2]]
            bad = eng.submit(poison, SamplingParams(max_tokens=6, **GREEDY))
            good.append(eng.submit(prompts[2], SamplingParams(max_tokens=6, **GREEDY)))
        with pytest.raises(RequestFailed, match="bad prompt"):
            bad.result(timeout=30)
        assert [h.result(timeout=30).token_ids for h in good] == [_ref(model, p, 6) for p in prompts]
        stats = eng.stats()
        assert (stats["requests_failed"], stats["requests_finished"], stats["running"]) == (1, 3, 0)
