"""The OpenAI-compatible server (step 9, `course_lib.serve`), through a real uvicorn server on 127.0.0.1.

The model is a small random GPT (context 256, seeded) with one random LoRA adapter, ``spam``, in PEFT's
format. Every answer is checked against an independent reference: step 5's ``inference.generate``
(greedy) on a copy of the model made before the engine touched it, the adapter loaded into that copy
with step 9's ``load_adapter``; and every request goes through the official ``openai`` client, or raw
``httpx`` where the wire format itself is checked.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch

from course_lib.config import get_config
from course_lib.engine import Engine, SamplingParams
from course_lib.evaluation import judge
from course_lib.inference import generate
from course_lib.instruction import format_prompt
from course_lib.lora import add_lora, load_adapter, lora_layers, save_adapter, set_adapter
from course_lib.model import GPTModel
from course_lib.serve import chat_prompt, create_app, running_server
from course_lib.tokenizers import tiktoken_gpt2

EOT = 50256
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def tok():
    return tiktoken_gpt2()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``(base, with_adapter, adapter_folder)``: untouched references, and the adapter's PEFT folder."""
    torch.manual_seed(0)
    base = GPTModel(get_config("gpt-tiny", context_length=256)).eval()
    trained = copy.deepcopy(base)
    add_lora(trained, rank=4, alpha=8, name="spam")
    with torch.no_grad():
        for layer in lora_layers(trained).values():
            layer.lora_B["spam"].normal_(0, 0.3)        # B starts at zero: make the adapter change something
    folder = save_adapter(trained, tmp_path_factory.mktemp("adapter") / "spam", "spam")
    with_adapter = copy.deepcopy(base)
    load_adapter(with_adapter, folder, name="spam")
    set_adapter(with_adapter, "spam")
    return base, with_adapter.eval(), folder


@pytest.fixture(scope="module")
def engine(models):
    base, _, folder = models
    eng = Engine(copy.deepcopy(base), name="base", adapters={"spam": folder}, max_batch=16)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def url(engine):
    with running_server(engine) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url):
    with openai.OpenAI(base_url=url, api_key="not-needed", max_retries=0, timeout=60) as c:
        yield c


def greedy(model, tok, prompt: str, max_tokens: int) -> tuple[str, str]:
    """``(text, finish_reason)`` as the engine promises it: ``inference.generate``'s greedy tokens, cut
    before the first end-of-text, and cut where the context is full."""
    ids = tok.encode(prompt, allowed_special={"<|endoftext|>"})
    room = min(max_tokens, model.cfg.context_length - len(ids))
    new = generate(model, torch.tensor([ids]), room, temperature=0)[0, len(ids):].tolist()
    if EOT in new:
        return tok.decode(new[:new.index(EOT)]), "stop"
    return tok.decode(new), "length"


def post(url: str, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60, **kwargs)


def events(response: httpx.Response) -> list:
    """The ``data:`` payloads of a server-sent-events body (``[DONE]`` kept as the string)."""
    out = []
    for block in response.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block.removeprefix("data: ")
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


# --------------------------------------------------------------------------- #
# chat -> prompt
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_chat_prompt_one_message_is_the_step7_template(style):
    message = {"role": "user", "content": "Name three fruits."}
    assert chat_prompt([message], style) == format_prompt({"instruction": "Name three fruits.", "input": ""}, style)


def test_chat_prompt_folds_system_and_history_into_the_instruction():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
                {"role": "user", "content": "Name a fruit."}]
    expected = ("<|user|>\nBe brief.\n\nUser: Hi\nAssistant: Hello!\n\nName a fruit.\n<|assistant|>\n")
    assert chat_prompt(messages, "phi3") == expected


@pytest.mark.parametrize("messages, match", [
    ([], "empty"),
    ([{"role": "assistant", "content": "x"}], "last message must be the user's"),
    ([{"role": "tool", "content": "x"}], "role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "text parts"),
    ([{"role": "user", "content": 3}], "string"),
    ([{"role": "user", "content": "  "}], "empty"),
])
def test_chat_prompt_bad_messages(messages, match):
    with pytest.raises((TypeError, ValueError), match=match):
        chat_prompt(messages)


def test_create_app_bad_arguments(engine):
    with pytest.raises(TypeError, match="Engine"):
        create_app(object())
    with pytest.raises(ValueError, match="style"):
        create_app(engine, style="chatml")
    with pytest.raises(ValueError, match="api_key"):
        create_app(engine, api_key="")


# --------------------------------------------------------------------------- #
# Through the server
# --------------------------------------------------------------------------- #
def test_models_list(client, url):
    listed = client.models.list().data
    assert [m.id for m in listed] == ["base", "spam"]
    assert all(m.object == "model" and m.owned_by == "course" and isinstance(m.created, int) for m in listed)
    assert client.models.retrieve("spam").id == "spam"
    health = httpx.get(url.removesuffix("/v1") + "/health").json()
    assert health["status"] == "ok" and health["models"] == ["base", "spam"]


def test_completion_equals_generate(client, models, tok, caplog):
    base, _, _ = models
    caplog.set_level(logging.INFO, logger="course_lib.serve")
    prompt = "Every morning the little robot"
    text, finish = greedy(base, tok, prompt, 12)
    r = client.completions.create(model="base", prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == "base" and r.id.startswith("cmpl-")
    assert [(c.index, c.text, c.finish_reason) for c in r.choices] == [(0, text, finish)]
    n_prompt = len(tok.encode(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)
    # one log line per request: method, path, status, model, tokens, milliseconds (written once the reply is sent)
    deadline = time.monotonic() + 5
    while not any("POST /v1/completions" in rec.getMessage() for rec in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any(f"POST /v1/completions 200 model=base tokens={n_prompt}+12 " in rec.getMessage()
               for rec in caplog.records), [rec.getMessage() for rec in caplog.records]


def test_completion_of_several_prompts_and_token_ids(client, models, tok):
    base, _, _ = models
    prompts = ["The cat", "A dog ran"]
    r = client.completions.create(model="base", prompt=prompts, max_tokens=5, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [greedy(base, tok, p, 5)[0] for p in prompts]
    r = client.completions.create(model="base", prompt=tok.encode("The cat"), max_tokens=5, temperature=0)
    assert r.choices[0].text == greedy(base, tok, "The cat", 5)[0]


def test_chat_equals_generate(client, models, tok):
    base, _, _ = models
    messages = [{"role": "user", "content": "Name three fruits."}]
    text, finish = greedy(base, tok, format_prompt({"instruction": "Name three fruits.", "input": ""}), 10)
    r = client.chat.completions.create(model="base", messages=messages, max_completion_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", text, finish)
    # max_tokens (the older name) works the same; without either, the answer runs to the end of the context
    r2 = client.chat.completions.create(model="base", messages=messages, max_tokens=10, temperature=0)
    assert r2.choices[0].message.content == text
    r3 = client.chat.completions.create(model="base", messages=messages, temperature=0)
    full, _ = greedy(base, tok, chat_prompt(messages), 10_000)
    assert r3.choices[0].message.content == full
    assert r3.usage.prompt_tokens + r3.usage.completion_tokens == 256 or r3.choices[0].finish_reason == "stop"


def test_streaming_chunks_join_to_the_whole_text(client, url):
    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = client.chat.completions.create(model="base", messages=messages, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model="base", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    # the wire format: data: {...} blocks, then data: [DONE]
    raw = events(post(url, "/completions", {"model": "base", "prompt": "Once", "max_tokens": 6, "temperature": 0,
                                            "stream": True}))
    plain = client.completions.create(model="base", prompt="Once", max_tokens=6, temperature=0)
    assert raw[-1] == "[DONE]" and all(e["object"] == "text_completion" for e in raw[:-1])
    assert "".join(e["choices"][0]["text"] for e in raw[:-1]) == plain.choices[0].text
    assert raw[-2]["choices"][0]["finish_reason"] == "length" and "usage" not in raw[-2]


def test_stop_sequences(client, models, tok):
    base, _, _ = models
    prompt = "Every morning the little robot"
    text, _ = greedy(base, tok, prompt, 12)
    ids = tok.encode(text)
    stop = tok.decode(ids[4:6])                      # a piece from the middle of the greedy answer
    assert stop and stop in text
    for stops in (stop, ["zzzz-never", stop]):
        r = client.completions.create(model="base", prompt=prompt, max_tokens=12, temperature=0, stop=stops)
        assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="base", prompt=prompt, max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[:text.index(stop)]


def test_max_tokens_gives_finish_reason_length(client):
    r = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                       temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_seed_reproducibility_and_n(client):
    def ask(seed, n=1):
        r = client.completions.create(model="base", prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                      seed=seed, n=n)
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first = ask(7)
    assert ask(7) == first and ask(8) != first
    pair = ask(7, n=2)
    assert len(pair) == 2 and pair[0] == first[0] and pair[1] != pair[0] and ask(7, n=2) == pair
    streamed = ["", ""]                  # n choices streamed side by side, told apart by index
    for c in client.completions.create(model="base", prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                       seed=7, n=2, stream=True):
        streamed[c.choices[0].index] += c.choices[0].text
    assert streamed == pair


def test_an_adapter_saved_with_its_chat_template_is_chatted_with_in_it(models, tok, tmp_path):
    """An instruction adapter that records its template (``course finetune instruct --lora`` saves it) gets
    chats in that template; the base and an adapter without one, in the server's. Through the server and
    through ``engine_replier`` (``course chat``)."""
    import shutil

    from course_lib.serve import chat_style, chat_template, engine_replier

    base, with_adapter, folder = models
    instr = tmp_path / "instr"
    shutil.copytree(folder, instr)
    (instr / "chat_template.jinja").write_text(chat_template("phi3"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
    greedy_params = SamplingParams(max_tokens=6, temperature=0)
    with Engine(copy.deepcopy(base), name="base", adapters={"spam": folder, "instr": instr}) as eng:
        assert [chat_style(eng, m) for m in ("base", "spam", "instr", None)] == ["alpaca", "alpaca", "phi3", "alpaca"]
        with running_server(eng) as url, openai.OpenAI(base_url=url, api_key="x", max_retries=0) as c:
            for model, ref, style in (("instr", with_adapter, "phi3"), ("spam", with_adapter, "alpaca"),
                                      ("base", base, "alpaca")):
                r = c.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
                assert r.choices[0].message.content == greedy(ref, tok, chat_prompt(messages, style), 6)[0], model
                assert r.usage.prompt_tokens == len(tok.encode(chat_prompt(messages, style)))
        reply = engine_replier(eng, model="instr", params=greedy_params)
        assert "".join(reply(messages)) == greedy(with_adapter, tok, chat_prompt(messages, "phi3"), 6)[0]
        (instr / "chat_template.jinja").unlink()          # read when loaded: the weights served are phi3-tuned
        assert chat_style(eng, "instr") == "phi3"


def test_adapter_is_chosen_by_model(client, models, tok):
    base, with_adapter, _ = models
    prompt = format_prompt({"instruction": "Is this spam? WIN A PRIZE NOW", "input": ""})
    expected, _ = greedy(with_adapter, tok, prompt, 10)
    assert expected != greedy(base, tok, prompt, 10)[0]
    r = client.chat.completions.create(model="spam", messages=[{"role": "user", "content":
                                                                "Is this spam? WIN A PRIZE NOW"}],
                                       max_tokens=10, temperature=0)
    assert r.choices[0].message.content == expected and r.model == "spam"


def test_32_concurrent_requests_are_correct_and_unmixed(client, models, tok):
    base, with_adapter, _ = models
    prompts = [f"Story number {i}:" for i in range(8)]
    jobs = [(p, name) for p in prompts for name in ("base", "spam")] * 2           # 32 requests
    expected = {(p, name): greedy(base if name == "base" else with_adapter, tok, p, 8)[0]
                for p, name in set(jobs)}

    def one(job):
        p, name = job
        return client.completions.create(model=name, prompt=p, max_tokens=8, temperature=0).choices[0].text

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, jobs))
    assert answers == [expected[job] for job in jobs]


def test_disconnect_mid_stream_cancels_and_the_server_keeps_serving(client, url, engine):
    cancelled = engine.stats()["requests_cancelled"]
    body = {"model": "base", "prompt": "Once", "max_tokens": 240, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as raw:
        with raw.stream("POST", url + "/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 10
    while engine.stats()["requests_cancelled"] == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["requests_cancelled"] == cancelled + 1
    assert engine.stats()["running"] == 0
    r = client.completions.create(model="base", prompt="Once", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("path, body, headers, status, param, code", [
    ("/chat/completions", b'{"model": "base", "messages": [', {"content-type": "application/json"}, 400, None, None),
    ("/chat/completions", b"[1, 2]", {"content-type": "application/json"}, 400, None, None),
    ("/chat/completions", {"model": "base"}, None, 400, "messages", None),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, None, 400, "model", None),
    ("/chat/completions", {"model": "base", "messages": [{"role": "assistant", "content": "hi"}]}, None, 400,
     "messages", None),
    ("/completions", {"model": "base", "prompt": "hi", "temperature": 3}, None, 400, "temperature", None),
    ("/completions", {"model": "base", "prompt": "hi", "max_tokens": 0}, None, 400, "max_tokens", None),
    ("/completions", {"model": "base", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, None, 400, "stop", None),
    ("/completions", {"model": "base", "prompt": "hi", "n": 0}, None, 400, "n", None),
    ("/completions", {"model": "base", "prompt": []}, None, 400, "prompt", None),
    ("/completions", {"model": "nope", "prompt": "hi"}, None, 404, "model", "model_not_found"),
    ("/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, None, 404, "model",
     "model_not_found"),
    ("/completions", {"model": "base", "prompt": "word " * 300}, None, 400, "prompt", "context_length_exceeded"),
    ("/nothing/here", {}, None, 404, None, "unknown_url"),
    # strict types, as OpenAI: no "5" for an integer, no true for a token id, no "yes" for a boolean
    ("/completions", {"model": "base", "prompt": "hi", "max_tokens": "5"}, None, 400, "max_tokens", None),
    ("/completions", {"model": "base", "prompt": [True, 2]}, None, 400, "prompt", None),
    ("/completions", {"model": "base", "prompt": "hi", "stream": "yes"}, None, 400, "stream", None),
    ("/completions", {"model": "base", "prompt": "hi", "stop": 5}, None, 400, "stop", None),
    ("/completions", {"model": "base", "prompt": "hi", "seed": 2**70}, None, 400, "seed", None),
    ("/completions", {"model": "base", "prompt": "hi", "stream_options": {"include_usage": True}}, None, 400,
     "stream_options", None),
    ("/completions", b'{"model": "base", "prompt": "hi"}', {"content-type": "text/plain"}, 400, None, None),
    ("/completions", b"", {"content-type": "application/json"}, 400, None, None),
    ("/completions", b'{"model": "base", "prompt": "\xff"}', {"content-type": "application/json"}, 400, None, None),
    ("/completions", b'{"model": "base", "prompt": "' + b"a" * (1 << 20) + b'"}', {"content-type": "application/json"},
     413, None, "request_too_large"),
])
def test_errors_in_openai_shape(url, path, body, headers, status, param, code):
    if isinstance(body, bytes):
        r = httpx.post(url + path, content=body, headers=headers, timeout=30)
    else:
        r = post(url, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS and error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    if code == "context_length_exceeded":
        assert "256" in error["message"]
    if isinstance(body, dict) and (body.get("stop") == 5 or body.get("prompt") == [True, 2]):
        assert "it must be a string" in error["message"] and "list of" in error["message"]   # every form
    if headers == {"content-type": "text/plain"}:
        assert "Content-Type: application/json" in error["message"]


CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "base", "prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize("base, field, value", [
    (COMPLETION, "suffix", " end."),
    (CHAT, "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    (CHAT, "functions", [{"name": "f", "parameters": {}}]), (CHAT, "tool_choice", "required"),
    (CHAT, "response_format", {"type": "json_object"})
])
def test_a_field_this_server_does_not_do_is_a_400_naming_it(url, base, field, value):
    """Asked for, an OpenAI field the engine does not do is refused by name (it was ignored: a client asking
    for log-probabilities or JSON got an answer to another request)."""
    path = "/chat/completions" if "messages" in base else "/completions"
    r = post(url, path, {**base, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"
    assert "does not support " + field in error["message"] and "leave it out" in error["message"]
    assert "Value error" not in error["message"]                          # pydantic's prefix is dropped


# --------------------------------------------------------------------------- #
# log-probabilities
# --------------------------------------------------------------------------- #
def _reference_logprobs(model, tok, prompt: str, new: list[int]) -> torch.Tensor:
    """log-softmax of the model's logits at each generated position ``[len(new), V]``: one forward pass."""
    ids = tok.encode(prompt)
    with torch.no_grad():
        logits = model(torch.tensor([ids + new]))[0, len(ids) - 1:len(ids) + len(new) - 1]
    return torch.log_softmax(logits.float(), dim=-1)


def _name(tok, token_id: int) -> str:
    raw = tok.decode_bytes([token_id])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _id(tok, name: str) -> int:
    """The token a completions ``logprobs`` name stands for (its bytes, as one token of tiktoken's)."""
    raw = bytes.fromhex(name[6:].replace("\\x", "")) if name.startswith("bytes:") else name.encode("utf-8")
    return tok.encode_single_token(raw)


def test_completion_logprobs_are_the_models_in_openais_shape(client, models, tok):
    base = models[0]
    prompt = "Once upon a time"
    r = client.completions.create(model="base", prompt=prompt, max_tokens=12, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    ids = tok.encode(prompt)
    new = generate(base, torch.tensor([ids]), 12, temperature=0)[0, len(ids):].tolist()     # greedy's tokens
    assert tok.decode(new) == r.choices[0].text
    ref = _reference_logprobs(base, tok, prompt, new)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
    assert lp.tokens == [_name(tok, t) for t in new]                    # tiktoken names every token
    assert lp.token_logprobs == pytest.approx([float(ref[k, t]) for k, t in enumerate(new)], abs=1e-4)
    for k, top in enumerate(lp.top_logprobs):
        best = ref[k].topk(3)
        assert top == pytest.approx({_name(tok, t): v for t, v in zip(best.indices.tolist(), best.values.tolist())},
                                    abs=1e-4)
        assert top[lp.tokens[k]] == lp.token_logprobs[k]                # greedy: the most likely one
    want_offsets = [len(tok.decode(new[:k])) for k in range(len(new))]
    assert lp.text_offset == want_offsets and lp.text_offset[0] == 0
    # streamed: the same entries, a chunk at a time, the offsets carried on
    chunks = list(client.completions.create(model="base", prompt=prompt, max_tokens=12, temperature=0, logprobs=3,
                                            stream=True, extra_body={"ignore_eos": True}))
    got = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum((g.tokens for g in got), []) == lp.tokens
    assert sum((g.token_logprobs for g in got), []) == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert sum((g.text_offset for g in got), []) == lp.text_offset


def test_a_sampled_token_outside_the_top_k_is_listed_too(client, models, tok):
    """OpenAI's rule: the sampled token's entry is always in top_logprobs (up to k + 1 of them)."""
    r = client.completions.create(model="base", prompt="The", max_tokens=24, temperature=2, seed=5, logprobs=1,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    new = [_id(tok, name) for name in lp.tokens]
    assert tok.decode(new) == r.choices[0].text
    ref = _reference_logprobs(models[0], tok, "The", new)
    assert lp.token_logprobs == pytest.approx([float(ref[k, t]) for k, t in enumerate(new)], abs=1e-4)
    outside = [k for k, top in enumerate(lp.top_logprobs) if len(top) == 2]
    assert outside, "at temperature 2 some sampled token should not be the most likely"
    for k in outside:
        assert lp.tokens[k] in lp.top_logprobs[k] and lp.top_logprobs[k][lp.tokens[k]] == lp.token_logprobs[k]
        best = int(ref[k].argmax())
        assert lp.top_logprobs[k][_name(tok, best)] == pytest.approx(float(ref[k, best]), abs=1e-4)
    assert all(len(top) == 1 for k, top in enumerate(lp.top_logprobs) if k not in outside)


def test_chat_logprobs_streamed_and_not_are_the_models(client, models, tok):
    base = models[0]
    messages = [{"role": "user", "content": "Name a colour."}]
    prompt = chat_prompt(messages)
    r = client.chat.completions.create(model="base", messages=messages, max_tokens=10, temperature=0,
                                       logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    ids = tok.encode(prompt)
    new = generate(base, torch.tensor([ids]), 10, temperature=0)[0, len(ids):].tolist()     # greedy's tokens
    assert tok.decode(new) == r.choices[0].message.content
    ref = _reference_logprobs(base, tok, prompt, new)
    assert [bytes(c.bytes) for c in content] == [tok.decode_bytes([t]) for t in new]
    assert [c.token for c in content] == [_name(tok, t) for t in new]
    assert [c.logprob for c in content] == pytest.approx([float(ref[k, t]) for k, t in enumerate(new)], abs=1e-4)
    for k, c in enumerate(content):
        best = ref[k].topk(2)
        assert [bytes(t.bytes) for t in c.top_logprobs] == [tok.decode_bytes([t]) for t in best.indices.tolist()]
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
    chunks = list(client.chat.completions.create(model="base", messages=messages, max_tokens=10, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True,
                                                 extra_body={"ignore_eos": True}))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.bytes) for e in streamed] == [(c.token, c.bytes) for c in content]
    assert [e.logprob for e in streamed] == pytest.approx([c.logprob for c in content], abs=1e-6)
    # logprobs without top_logprobs: no alternatives; not asked: null
    r = client.chat.completions.create(model="base", messages=messages, max_tokens=3, temperature=0, logprobs=True)
    assert [c.top_logprobs for c in r.choices[0].logprobs.content] == [[]] * len(r.choices[0].logprobs.content)
    r = client.chat.completions.create(model="base", messages=messages, max_tokens=3, temperature=0)
    assert r.choices[0].logprobs is None


def test_text_offsets_after_an_unfinished_character_and_inside_a_stop_string(client, models, tok):
    from course_lib.engine import TokenLogprob
    from course_lib.serve import _completion_logprobs

    # "a", a lone continuation byte, three of a four-byte character's bytes, "b": the text is "a\ufffd\ufffdb"
    pieces = [b"a", b"\x80", b"\xf0\x9f\x98", b"b"]
    ids = [tok.encode_single_token(p) for p in pieces]
    text = b"".join(pieces).decode("utf-8", errors="replace")
    got = _completion_logprobs(tok, [TokenLogprob(t, -1.0, []) for t in ids])
    assert text == "a\ufffd\ufffdb" and got["text_offset"] == [0, 1, 2, 3]           # "b" was put at 2
    assert got["tokens"] == ["a", "bytes:\\x80", "bytes:\\xf0\\x9f\\x98", "b"]
    # a stop string cut inside a token: its entry stays, the offsets stay inside the text
    full = client.completions.create(model="base", prompt="Once upon a time", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[7:11]
    r = client.completions.create(model="base", prompt="Once upon a time", max_tokens=12, temperature=0,
                                  logprobs=1, stop=[stop], extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.text == full[:full.find(stop)] and c.finish_reason == "stop"
    assert "".join(c.logprobs.tokens).startswith(c.text) and len("".join(c.logprobs.tokens)) > len(c.text)
    assert max(c.logprobs.text_offset) <= len(c.text)


def test_a_streamed_chunk_without_tokens_has_null_logprobs(models):
    """A model that says <|endoftext|> at once: the last chunk has no token, and its logprobs are null."""
    eager = copy.deepcopy(models[0])
    head = torch.nn.Linear(eager.cfg.emb_dim, eager.cfg.vocab_size)      # the same head, with a bias for EOT
    with torch.no_grad():
        head.weight.copy_(eager.out_head.weight)
        head.bias.zero_()[EOT] = 1e4
    eager.out_head = head
    with Engine(eager, name="base") as eng, running_server(eng) as base_url:
        for path, body in (("/completions", {**COMPLETION, "logprobs": 1}),
                           ("/chat/completions", {**CHAT, "logprobs": True})):
            chunks = [e for e in events(post(base_url, path, {**body, "temperature": 0, "stream": True}))
                      if e != "[DONE]"]
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop", chunks
            assert all(c["choices"][0]["logprobs"] is None for c in chunks), chunks
            plain = post(base_url, path, {**body, "temperature": 0}).json()["choices"][0]
            assert plain["logprobs"] in ({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []},
                                         {"content": [], "refusal": None})     # asked for, none to give


def test_echo_with_max_tokens_0_scores_the_prompt_as_evaluation_harnesses_ask(client, models, tok):
    """lm-evaluation-harness' log-likelihood request: the prompt echoed with its tokens' log-probabilities,
    nothing generated."""
    prompt = "The cat sat on the mat."
    ids = tok.encode(prompt)
    ref = _reference_logprobs(models[0], tok, tok.decode(ids[:1]), ids[1:])
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(model="base", prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                                    stream=True, stream_options={"include_usage": True}))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
            lp = SimpleNamespace(tokens=sum((p.tokens for p in parts), []),
                                token_logprobs=sum((p.token_logprobs for p in parts), []),
                                top_logprobs=sum((p.top_logprobs for p in parts), []),
                                text_offset=sum((p.text_offset for p in parts), []))
            usage, finish = chunks[-1].usage, [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            r = client.completions.create(model="base", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
            text, lp, usage, finish = r.choices[0].text, r.choices[0].logprobs, r.usage, r.choices[0].finish_reason
        assert text == prompt and finish == "length", stream
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), 0)
        assert lp.tokens == [_name(tok, t) for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx([float(ref[k, t]) for k, t in enumerate(ids[1:])], abs=1e-4)
        assert [max(top.values()) for top in lp.top_logprobs[1:]] == pytest.approx(ref.max(-1).values.tolist(),
                                                                                    abs=1e-4)
        assert lp.text_offset == [len(tok.decode(ids[:k])) for k in range(len(ids))]


def test_a_prompt_that_fills_the_context_can_be_scored_and_an_empty_one_echoes_what_was_read(client, models, tok):
    ids = torch.randint(0, 50257, (256,), generator=torch.Generator().manual_seed(3)).tolist()   # the whole context
    r = client.completions.create(model="base", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    with torch.no_grad():
        logp = torch.log_softmax(models[0](torch.tensor([ids]))[0, :-1].float(), dim=-1)
    want = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert r.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert r.usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError, match="no room"):            # generating needs room after it
        client.completions.create(model="base", prompt=ids, max_tokens=1, echo=True)
    # "" is read as <|endoftext|>: the echo is what was read, so text and tokens agree
    for stream in (False, True):
        got = client.completions.create(model="base", prompt="", max_tokens=3, temperature=0, echo=True, logprobs=0,
                                        stream=stream, extra_body={"ignore_eos": True})
        chunks = list(got) if stream else [got]
        text = "".join(c.choices[0].text for c in chunks)
        tokens = sum((c.choices[0].logprobs.tokens for c in chunks if c.choices[0].logprobs), [])
        offsets = sum((c.choices[0].logprobs.text_offset for c in chunks if c.choices[0].logprobs), [])
        assert text.startswith("<|endoftext|>") and "".join(tokens) == text
        assert offsets == [len("".join(tokens[:k])) for k in range(len(tokens))]


def test_echo_prepends_the_prompt_to_every_choice_and_its_logprobs(client, models, tok):
    prompt = "Once upon a time"
    ids = tok.encode(prompt)
    r = client.completions.create(model="base", prompt=[prompt, prompt], max_tokens=5, temperature=0, echo=True,
                                  logprobs=0, n=2, extra_body={"ignore_eos": True})
    by_ids = client.completions.create(model="base", prompt=[ids], max_tokens=5, temperature=0, echo=True,
                                       logprobs=0, extra_body={"ignore_eos": True})
    greedy_ids = generate(models[0], torch.tensor([ids]), 5, temperature=0)[0].tolist()    # prompt + new
    ref = _reference_logprobs(models[0], tok, tok.decode(ids[:1]), greedy_ids[1:])
    assert len(r.choices) == 4 and r.usage.completion_tokens == 4 * 5
    for c in [*r.choices, *by_ids.choices]:
        assert c.text == tok.decode(greedy_ids)                    # the prompt, then the completion
        assert c.logprobs.tokens == [_name(tok, t) for t in greedy_ids]
        assert c.logprobs.token_logprobs[1:] == pytest.approx([float(ref[k, t]) for k, t in
                                                               enumerate(greedy_ids[1:])], abs=1e-4)
        assert c.logprobs.text_offset == [len(tok.decode(greedy_ids[:k])) for k in range(len(greedy_ids))]
    plain = client.completions.create(model="base", prompt=prompt, max_tokens=5, temperature=0, echo=True)
    assert plain.choices[0].text == r.choices[0].text and plain.choices[0].logprobs is None
    chunks = list(client.completions.create(model="base", prompt=prompt, max_tokens=5, temperature=0, echo=True,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[0].choices[0].text == prompt                    # the prompt comes first, alone


@pytest.mark.parametrize("path, body, field", [
    ("/completions", {**COMPLETION, "logprobs": 21}, "logprobs"),
    ("/completions", {**COMPLETION, "logprobs": True}, "logprobs"),
    ("/chat/completions", {**CHAT, "top_logprobs": 3}, "top_logprobs"),
    ("/chat/completions", {**CHAT, "logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ("/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/chat/completions", {**CHAT, "logprobs": 1}, "logprobs"),
    ("/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens"),
    ("/completions", {**COMPLETION, "max_tokens": 0, "echo": False}, "max_tokens"),
    ("/completions", {**COMPLETION, "echo": 1}, "echo"),
    ("/completions", {**COMPLETION, "n": 3, "best_of": 2}, "best_of"),
    ("/completions", {**COMPLETION, "best_of": 2, "stream": True}, "best_of"),
    ("/completions", {**COMPLETION, "best_of": 0}, "best_of"),
    ("/completions", {**COMPLETION, "best_of": 65}, "best_of"),
    ("/completions", {**COMPLETION, "prompt": ["a", "b"], "best_of": 40}, "best_of"),
    ("/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
])
def test_bad_logprobs_and_echo_requests_are_400s_naming_the_field(url, path, body, field):
    r = post(url, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error", error
    if field == "top_logprobs" and body.get("top_logprobs") == 3 or body.get("logprobs") is False:
        assert '"logprobs": true' in error["message"]


def test_penalties_and_logit_bias_are_openais(client, models, tok):
    """The server's choice equals a hand-written greedy loop with OpenAI's formula: bias added, then
    presence_penalty once and frequency_penalty per use subtracted for each generated token."""
    base = models[0]
    prompt, bias = "Once upon a time", {"42": 6.0, "1110": 4.0}
    ids = tok.encode(prompt)
    for presence, frequency in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.5), (0.5, 2.0)):
        out, counts = [], {}
        for _ in range(10):
            with torch.no_grad():
                logits = base(torch.tensor([ids + out]))[0, -1].float()
            for t, b in bias.items():
                logits[int(t)] += b
            for t, c in counts.items():
                logits[t] -= frequency * c + presence
            out.append(int(logits.argmax()))
            counts[out[-1]] = counts.get(out[-1], 0) + 1
        r = client.completions.create(model="base", prompt=prompt, max_tokens=10, temperature=0, logit_bias=bias,
                                      presence_penalty=presence, frequency_penalty=frequency,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == tok.decode(out), (presence, frequency)
    assert tok.decode([42]) in r.choices[0].text                 # the bias does something
    r = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0.8, seed=3, logit_bias={"42": 100})
    assert r.choices[0].message.content == tok.decode([42] * 4)


@pytest.mark.parametrize("body, field", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"presence_penalty": True}, "presence_penalty"), ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"5": 200}}, "logit_bias"),
    ({"logit_bias": {"60000": 1}}, "logit_bias"), ({"logit_bias": [5]}, "logit_bias"),
    ({"logit_bias": {"5": "x"}}, "logit_bias"),
    ({"logit_bias": {"\u00b2": 1}}, "logit_bias"), ({"logit_bias": {"\u0663": 1}}, "logit_bias"),
    ({"logit_bias": {"9" * 5000: 1}}, "logit_bias"), ({"logit_bias": {"1": 1, "01": 1}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
])
def test_bad_penalties_and_biases_are_400s_naming_the_field(url, body, field):
    for base, path in ((COMPLETION, "/completions"), (CHAT, "/chat/completions")):
        r = post(url, path, {**base, **body})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"].split(".")[0] == field and error["type"] == "invalid_request_error", error


def test_best_of_returns_the_n_likeliest_of_its_candidates(client):
    kw = dict(model="base", prompt="Once upon a time", max_tokens=8, temperature=1.5, seed=7,
              extra_body={"ignore_eos": True})
    all_four = client.completions.create(n=4, logprobs=0, **kw)                # the candidates: seeds 7..10
    mean = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in all_four.choices]
    order = sorted(range(4), key=lambda i: -mean[i])
    assert len({c.text for c in all_four.choices}) == 4
    best = client.completions.create(n=2, best_of=4, **kw)
    assert [c.text for c in best.choices] == [all_four.choices[i].text for i in order[:2]]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == 4 * 8                              # every candidate's tokens
    scored = client.completions.create(best_of=4, logprobs=2, **kw)            # n = 1, with its logprobs
    assert scored.choices[0].text == all_four.choices[order[0]].text
    assert scored.choices[0].logprobs.token_logprobs == pytest.approx(all_four.choices[order[0]].logprobs.token_logprobs)


def test_the_default_values_clients_send_for_those_fields_pass(client):
    """What the openai client, LangChain and others send when nothing was asked: null, false, 0, {}, []."""
    r = client.completions.create(model="base", prompt="hi", max_tokens=2, echo=False, best_of=1, logprobs=None,
                                  presence_penalty=0, frequency_penalty=0.0, logit_bias={}, suffix=None)
    assert r.usage.completion_tokens == 2
    r = client.completions.create(model="base", prompt="hi", max_tokens=2, n=2, best_of=2)
    assert len(r.choices) == 2
    r = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       logprobs=False, top_logprobs=0, tools=[], tool_choice="none",
                                       response_format={"type": "text"}, presence_penalty=0, user="ada")
    assert r.choices[0].finish_reason == "length"


def test_a_chunked_body_too_large_is_refused_and_the_server_keeps_serving(client, url):
    def chunks():                                               # no Content-Length: counted as it comes
        yield b'{"model": "base", "prompt": "'
        for _ in range(20):
            yield b"a" * 65536
        yield b'"}'

    r = httpx.post(url + "/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert client.completions.create(model="base", prompt="hi", max_tokens=1).usage.completion_tokens == 1


def test_seed_of_the_last_choice_wraps_around(client):
    """Choice j uses seed + j modulo 2**64 (the generator's seeds): seed 2**64 - 1, n=2 gives choice 1 the
    text of seed 0 (it was a 400 naming no field)."""
    r = client.completions.create(model="base", prompt="Once", max_tokens=5, n=2, seed=2**64 - 1)
    zero = client.completions.create(model="base", prompt="Once", max_tokens=5, seed=0)
    assert r.choices[1].text == zero.choices[0].text


def test_errors_reach_the_openai_client_as_its_exceptions(client):
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="256"):
        client.completions.create(model="base", prompt="word " * 300)


def test_api_key(engine):
    with running_server(engine, api_key="sk-secret") as url:
        body = {"model": "base", "prompt": "hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-secret"}):
            r = post(url, "/completions", body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
            assert set(r.json()["error"]) == ERROR_KEYS
        assert post(url, "/completions", body, headers={"Authorization": "Bearer sk-secret"}).status_code == 200
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200        # probes need no key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert [m.id for m in openai.OpenAI(base_url=url, api_key="sk-secret").models.list().data] == ["base", "spam"]


def test_step7_judge_runs_through_this_server(url, engine):
    entries = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
               {"instruction": "Name a colour.", "input": "", "output": "Blue."}]
    before = engine.stats()["requests_finished"]
    result = judge(entries, ["5", "Red."], base_url=url, model="base", max_retries=0, timeout=60, progress=False)
    # a random model gives no usable score; the mechanics are what is checked
    assert result.errors == [None, None]
    assert all(isinstance(reply, str) for reply in result.replies)
    assert all(s is None or 0 <= s <= 100 for s in result.scores)
    assert engine.stats()["requests_finished"] == before + 2


@pytest.fixture
def slow_engine(models):
    """An engine of the base model at under 100 tokens/s, so that requests are still running when a test acts."""
    model = copy.deepcopy(models[0])
    model.register_forward_hook(lambda *args: time.sleep(0.01))
    eng = Engine(model, name="base", max_batch=4, fast=False)
    yield eng
    eng.shutdown()


def test_a_client_gone_from_a_plain_request_frees_its_row(slow_engine):
    """Not streamed: a client that times out cancels its request (it ran to the context's end before)."""
    with running_server(slow_engine) as url:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/chat/completions", timeout=0.5,
                       json={"model": "base", "messages": [{"role": "user", "content": "hi"}]})
        deadline = time.monotonic() + 5
        while slow_engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = slow_engine.stats()
        assert (stats["running"], stats["requests_cancelled"], stats["requests_finished"]) == (0, 1, 0)


def test_engine_shutdown_ends_open_streams_and_later_requests_get_503(slow_engine):
    body = {"model": "base", "prompt": "Once", "max_tokens": 200, "stream": True}
    with running_server(slow_engine) as url, httpx.Client(timeout=10) as raw:
        with raw.stream("POST", url + "/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            slow_engine.shutdown()
            rest = [line.removeprefix("data: ") for line in lines if line]
        assert rest[-1] == "[DONE]"
        error = json.loads(rest[-2])["error"]
        assert set(error) == ERROR_KEYS and error["type"] == "server_error" and "shut down" in error["message"]
        r = post(url, "/completions", {"model": "base", "prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_shut_down"
        assert httpx.get(url.removesuffix("/v1") + "/health").json()["status"] == "shut down"


def test_ignore_eos_decodes_past_end_of_text(client, engine, monkeypatch):
    """vLLM's extra field: the engine is asked to stop on no token (benchmarks decode exactly max_tokens)."""
    seen = []
    submit = engine.submit

    def spy(prompt, params=None, model=None):
        seen.append(params.stop_token_ids)
        return submit(prompt, params, model)

    monkeypatch.setattr(engine, "submit", spy)
    r = client.completions.create(model="base", prompt="Hi", max_tokens=2, temperature=0, extra_body={"ignore_eos": True})
    client.completions.create(model="base", prompt="Hi", max_tokens=2, temperature=0)
    assert seen == [(), (EOT,)] and r.choices[0].finish_reason == "length"


def test_starting_a_server_leaves_the_programs_logging_alone(engine):
    """Regression: uvicorn's default log_config ran dictConfig, which closed every existing logging handler
    (absl's, imported by rouge_score, then closed the real stderr and pytest lost its output)."""
    import logging

    class Recorder(logging.Handler):
        closed = False

        def emit(self, record):
            pass

        def close(self):
            Recorder.closed = True
            super().close()

    handler = Recorder()
    logging.getLogger().addHandler(handler)
    try:
        with running_server(engine):
            pass
        assert not Recorder.closed and handler in logging.getLogger().handlers
    finally:
        logging.getLogger().removeHandler(handler)


def test_coalesce_keeps_each_choices_text_in_order_and_ends_last():
    from course_lib.engine import Delta
    from course_lib.serve import _coalesce

    err = RuntimeError("x")
    items = [(0, Delta("a", [1])), (1, Delta("b", [2])), (0, Delta("c", [3])), (1, err), (0, Delta("d", [4], "stop")),
             (0, None), (1, None)]
    assert _coalesce(items) == [(0, Delta("acd", [1, 3, 4], "stop")), (1, Delta("b", [2])), (1, err), (0, None),
                                (1, None)]
    assert _coalesce([(0, Delta("a", [1], "length")), (0, None)]) == [(0, Delta("a", [1], "length")), (0, None)]
    assert _coalesce([(0, Delta("", []))]) == [(0, Delta("", []))]


def test_a_stream_that_falls_behind_sends_the_backlog_in_one_chunk(client, monkeypatch):
    """While the event loop is busy (here: its first chunk takes 0.5 s to write) the engine goes on decoding;
    the tokens made meanwhile go out in one chunk, not one chunk each, and the text is the same."""
    import course_lib.serve as serve_mod

    real, calls = serve_mod._sse, []

    def slow_first(obj):
        calls.append(obj)
        if len(calls) == 1:
            time.sleep(0.5)                             # blocks the server's event loop
        return real(obj)

    monkeypatch.setattr(serve_mod, "_sse", slow_first)
    plain = client.completions.create(model="base", prompt="Once", max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True})
    calls.clear()
    chunks = list(client.completions.create(model="base", prompt="Once", max_tokens=24, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert plain.usage.completion_tokens == 24
    assert len(chunks) <= 4, f"{len(chunks)} chunks for 24 tokens made while the loop was busy"


def test_requests_are_tokenized_off_the_event_loop(client, engine, monkeypatch):
    """Tokenizing a long prompt takes about a second per MiB: ``engine.submit`` runs in a worker thread, never
    on the event loop that streams every other request's tokens."""
    import asyncio

    where = []
    submit = engine.submit

    def spy(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:
            where.append("worker thread")
        return submit(*args, **kwargs)

    monkeypatch.setattr(engine, "submit", spy)
    client.completions.create(model="base", prompt="Hello", max_tokens=2)
    list(client.completions.create(model="base", prompt="Hello", max_tokens=2, stream=True))
    client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError):                     # errors still come back as 400s
        client.completions.create(model="base", prompt="x " * 5000, max_tokens=2)
    assert where == ["worker thread"] * 4
