"""Step 7 evaluation: response loss, exact match, ROUGE-L, the LLM judge.

References: per-token log-probabilities computed here from the model's logits, unpadded
(response loss); hand-computed values and the ``rouge-score`` package (ROUGE-L); a local
HTTP server speaking the chat-completions protocol, started by the tests (the judge)."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from course_lib.config import get_config
from course_lib.evaluation import (
    JUDGE_PROMPT,
    JudgeResult,
    exact_match,
    judge,
    lcs_length,
    mean_scores,
    normalize_text,
    parse_score,
    response_loss,
    rouge_l,
    rouge_tokens,
)
from course_lib.instruction import format_prompt
from course_lib.model import GPTModel
from course_lib.tokenizers import tiktoken_gpt2

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def reference_rouge_l(prediction: str, reference: str) -> float:
    return SCORER.score(reference, prediction)["rougeL"].fmeasure   # rouge-score takes (target, prediction)


# --------------------------------------------------------------------------- #
# Exact match
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("text, expected", [
    ("  The Capital,   is PARIS! ", "the capital is paris"),
    ("Hello,\n\tworld...", "hello world"),
    ("“Quoted” — text…", "quoted text"),                 # Unicode punctuation goes too
    ("don't", "dont"),                                    # removed, not replaced by a space (as SQuAD)
    ("STRASSE", "strasse"), ("Straße", "strasse"),        # case folded, not only lower-cased
    ("ﬁne", "fine"),                                      # NFKC
    ("a cat", "a cat"), ("the end", "the end"),           # articles are kept
    ("", ""), ("?!.", ""),
])
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


def test_exact_match():
    assert exact_match("Paris.", "paris")
    assert exact_match("The meal was cooked by the chef.", "the meal  was cooked by the chef")
    assert exact_match("", "...")
    assert not exact_match("Paris", "Paris, France")
    assert not exact_match("The cat", "cat")             # articles count
    assert isinstance(exact_match("a", "a"), bool)
    with pytest.raises(TypeError, match="prediction must be a string"):
        exact_match(None, "a")
    with pytest.raises(TypeError, match="reference must be a string"):
        exact_match("a", 3)


# --------------------------------------------------------------------------- #
# ROUGE-L
# --------------------------------------------------------------------------- #
def test_lcs_length_by_hand():
    assert lcs_length([], ["a"]) == 0
    assert lcs_length("abcbdab", "bdcaba") == 4         # CLRS: "bcba"
    assert lcs_length("the cat sat".split(), "the black cat".split()) == 2
    assert lcs_length(list("aaaa"), list("aa")) == 2


def test_rouge_l_by_hand():
    # 6 and 6 tokens, LCS "the cat on the mat" = 5: P = R = 5/6, F1 = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # P = 2/2, R = 2/4: F1 = 2 * 1 * 0.5 / 1.5 = 2/3.
    assert rouge_l("red apple", "a red shiny apple") == pytest.approx(2 / 3)
    assert rouge_l("Hello, World!", "hello world") == 1.0     # lower-cased, punctuation dropped
    assert rouge_l("apples", "apple") == 0.0                   # no stemming
    assert rouge_l("one two", "three four") == 0.0
    assert rouge_tokens("It's 5 o'clock, Café!") == ["it", "s", "5", "o", "clock", "caf"]


PAIRS = [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("The meal was cooked by the chef.", "The chef cooked the meal."),
    ("A B C D E", "e d c b a"),
    ("police killed the gunman", "the gunman killed police"),
    ("It's 3 o'clock; the train (No. 42) left.", "the train no 42 left at 3 o clock"),
    ("running runs ran", "run running"),
    ("Café naïve résumé", "cafe naive resume"),
    ("北京 is big", "Beijing is big"),
    ("İstanbul K", "i̇stanbul k"),                              # lower() of 'İ' is 'i' + a combining dot
    ("word " * 30, "word " * 7 + "other " * 5),
    ("", ""), ("", "something"), ("something", ""),
    ("?!...", "?!..."), ("---", "word"), ("word", "—"),
    ("   \n\t ", "a"),
]


@pytest.mark.parametrize("prediction, reference", PAIRS)
def test_rouge_l_equals_rouge_score(prediction, reference):
    assert rouge_l(prediction, reference) == pytest.approx(reference_rouge_l(prediction, reference), abs=1e-12)


def test_rouge_l_without_words_is_zero_like_rouge_score():
    # rouge-score gives 0 when either side has no token, even for two empty strings.
    for pred, ref in [("", ""), ("!!", "!!"), ("", "a"), ("a", "")]:
        assert reference_rouge_l(pred, ref) == 0
        assert rouge_l(pred, ref) == 0.0
        assert isinstance(rouge_l(pred, ref), float)


WORDS = st.sampled_from(["the", "cat", "sat", "on", "a", "mat", "Dog", "RAN", "42", "x"])
SEPARATORS = st.sampled_from([" ", "  ", ", ", ". ", "\n", "-", "'", " ! "])


@st.composite
def sentences(draw) -> str:
    words = draw(st.lists(WORDS, max_size=12))
    return "".join(w + draw(SEPARATORS) for w in words)


@given(prediction=st.one_of(sentences(), st.text(max_size=40)),
       reference=st.one_of(sentences(), st.text(max_size=40)))
@example(prediction="", reference="")
@example(prediction="cat the", reference="the cat")
def test_rouge_l_property_equals_rouge_score(prediction, reference):
    ours = rouge_l(prediction, reference)
    assert ours == pytest.approx(reference_rouge_l(prediction, reference), abs=1e-12)
    assert 0.0 <= ours <= 1.0
    assert ours == pytest.approx(rouge_l(reference, prediction), abs=1e-12)   # F1 is symmetric
    if rouge_tokens(prediction):
        assert rouge_l(prediction, prediction) == 1.0


def test_rouge_l_rejects_non_strings():
    with pytest.raises(TypeError, match="prediction must be a string"):
        rouge_l(["a"], "a")
    with pytest.raises(TypeError, match="reference must be a string"):
        rouge_l("a", None)


def test_mean_scores():
    preds = ["Paris.", "the cat sat on the mat", "nothing"]
    refs = ["paris", "the cat is on the mat", "something else"]
    out = mean_scores(preds, refs)
    assert out["count"] == 3
    assert out["exact_match"] == pytest.approx(1 / 3)
    assert out["rouge_l"] == pytest.approx((1 + 5 / 6 + 0) / 3)
    assert out["rouge_l"] == pytest.approx(sum(reference_rouge_l(p, r) for p, r in zip(preds, refs)) / 3)


def test_mean_scores_bad_input():
    with pytest.raises(ValueError, match="2 predictions and 1 references"):
        mean_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        mean_scores([], [])
    with pytest.raises(TypeError, match="predictions must be a list of strings"):
        mean_scores("abc", "abc")
    with pytest.raises(TypeError, match=r"references\[1\] must be a string"):
        mean_scores(["a", "b"], ["a", None])


# --------------------------------------------------------------------------- #
# Parsing a judge's reply
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("reply, expected", [
    ("85", 85), ("85.", 85), (" 85\n", 85), ("Score: 85/100", 85), ("**92**", 92), ("100", 100), ("0", 0),
    ("92.5", 93), ("I would rate it 70 out of 100.", 70),
    ("On a scale of 0-100: 64", 64), ("From 0 to 100, I give 40.", 40),
    ("<think>The reference says 3 apples, the response 30.</think>\n55", 55),
    ("No number here.", None), ("", None), (None, None),
    ("150", None), ("-5", None), ("101/100", None),
    ("<think>still thinking about 20", None),
])
def test_parse_score(reply, expected):
    assert parse_score(reply) == expected


# --------------------------------------------------------------------------- #
# The judge, against a local chat-completions server
# --------------------------------------------------------------------------- #
class ChatServer:
    """A chat-completions server on 127.0.0.1 whose replies a test scripts.

    ``script(i, body)`` gives request ``i``'s answer: a ``str`` (the assistant's content), an
    ``int`` (that HTTP status, with an OpenAI-style error body), ``("sleep", s, content)``
    or ``"<drop>"`` (close the connection without answering).
    """

    def __init__(self, script):
        self.script = script
        self.requests: list[dict] = []   # {"path", "headers", "body"}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):   # keep the test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server.lock:
                    i = len(server.requests)
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                answer = server.script(i, body)
                if isinstance(answer, tuple) and answer[0] == "sleep":
                    time.sleep(answer[1])
                    answer = answer[2]
                if answer == "<drop>":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return None
                if isinstance(answer, int):
                    error = {"message": f"scripted error {answer}", "type": "server_error"}
                    return self._send(answer, {"error": error})
                return self._send(200, {
                    "id": f"chatcmpl-{i}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "?"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}})

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def prompts(self) -> list[str]:
        return [r["body"]["messages"][-1]["content"] for r in self.requests]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve(monkeypatch):
    """``serve(script)`` → a running :class:`ChatServer`; no proxy between the client and it."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    servers = []

    def start(script):
        servers.append(ChatServer(script if callable(script) else (lambda i, body: script[i])))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


ENTRIES = [
    {"instruction": "Rewrite the sentence in passive voice.", "input": "The chef cooked the meal.",
     "output": "The meal was cooked by the chef."},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "What is 2 + 3?", "output": "5"},                       # no 'input' at all
]
RESPONSES = ["The meal was cooked by a chef.", "Green.", "2 + 3 = 5"]
FAST = dict(max_retries=0, timeout=5.0, progress=False)


def test_judge_scores_and_prompt(serve):
    server = serve(["90", " 20 ", "Score: 85/100"])
    result = judge(ENTRIES, RESPONSES, base_url=server.url, model="judge-model", **FAST)
    assert isinstance(result, JudgeResult)
    assert result.scores == [90, 20, 85]
    assert result.mean == pytest.approx(65.0) and result.count == 3
    assert result.failed == 0 and result.unparsed == 0
    assert result.replies == ["90", " 20 ", "Score: 85/100"]
    assert result.as_dict() == {"mean": pytest.approx(65.0), "count": 3, "total": 3, "failed": 0, "unparsed": 0}
    assert len(server.requests) == 3
    for request, entry, response in zip(server.requests, ENTRIES, RESPONSES):
        assert request["path"] == "/v1/chat/completions"
        body = request["body"]
        assert body["model"] == "judge-model" and body["temperature"] == 0
        prompt = body["messages"][-1]["content"]
        assert body["messages"][-1]["role"] == "user"
        assert entry["instruction"] in prompt and entry["output"] in prompt and response in prompt
        assert "0 to 100" in prompt
        if entry.get("input"):
            assert entry["input"] in prompt
    first = server.prompts()[0]
    assert first.index("Rewrite the sentence") < first.index("The chef cooked the meal.") \
        < first.index("The meal was cooked by the chef.") < first.index("The meal was cooked by a chef.")


def test_judge_reply_without_a_number_is_missing(serve):
    server = serve(["80", "I am not sure how to grade this.", "60"])
    result = judge(ENTRIES, RESPONSES, base_url=server.url, model="m", **FAST)
    assert result.scores == [80, None, 60]
    assert result.mean == pytest.approx(70.0) and result.count == 2
    assert result.unparsed == 1 and result.failed == 0
    assert result.replies[1] == "I am not sure how to grade this."


def test_judge_server_error_on_one_item_goes_on(serve):
    server = serve(["75", 500, "65"])
    result = judge(ENTRIES, RESPONSES, base_url=server.url, model="m", **FAST)
    assert result.scores == [75, None, 65]
    assert result.count == 2 and result.mean == pytest.approx(70.0)
    assert result.failed == 1 and result.unparsed == 0
    assert result.errors[1].startswith("HTTP 500") and "scripted error 500" in result.errors[1]
    assert result.errors[0] is None and result.replies[1] is None
    assert len(server.requests) == 3                       # max_retries=0: one request per item


def test_judge_retries_a_server_error(serve):
    server = serve(lambda i, body: 503 if i == 0 else "88")
    result = judge(ENTRIES[:1], RESPONSES[:1], base_url=server.url, model="m", max_retries=1, timeout=5.0,
                   progress=False)
    assert result.scores == [88] and len(server.requests) == 2


def test_judge_dropped_connection_after_a_success_is_a_failure(serve):
    server = serve(["50", "<drop>", "70"])
    result = judge(ENTRIES, RESPONSES, base_url=server.url, model="m", **FAST)
    assert result.scores == [50, None, 70] and result.failed == 1
    assert "Connection" in result.errors[1]


def test_judge_api_key_sent_as_bearer(serve):
    server = serve(lambda i, body: "50")
    judge(ENTRIES[:1], RESPONSES[:1], base_url=server.url, model="m", api_key="sk-test-123", **FAST)
    judge(ENTRIES[:1], RESPONSES[:1], base_url=server.url, model="m", **FAST)
    headers = [{k.lower(): v for k, v in r["headers"].items()} for r in server.requests]
    assert headers[0]["authorization"] == "Bearer sk-test-123"
    assert headers[1]["authorization"] == "Bearer not-needed"


def test_judge_custom_template_and_progress(serve):
    server = serve(lambda i, body: "42")
    template = "Q: {instruction}\nGold: {reference}\nGot: {response}\nScore {{0-100}}:"
    result = judge(ENTRIES[:2], RESPONSES[:2], base_url=server.url, model="m", prompt_template=template,
                   max_retries=0, timeout=5.0, progress=True)
    assert result.scores == [42, 42]
    assert server.prompts()[1] == "Q: Name a primary colour.\nGold: Red.\nGot: Green.\nScore {0-100}:"
    assert server.prompts()[0].startswith("Q: Rewrite the sentence in passive voice.\n\n### Input:\nThe chef")
    assert "{response}" in JUDGE_PROMPT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_judge_nothing_listening_is_a_connection_error(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    url = f"http://127.0.0.1:{free_port()}/v1"
    started = time.perf_counter()
    with pytest.raises(ConnectionError) as info:
        judge(ENTRIES, RESPONSES, base_url=url, model="m", max_retries=0, timeout=2.0, progress=False)
    message = str(info.value)
    assert url in message and "ollama serve" in message
    assert time.perf_counter() - started < 10      # stops at the first failure, not once per item


def test_judge_timeout_is_a_connection_error(serve):
    server = serve(lambda i, body: ("sleep", 1.0, "50"))
    with pytest.raises(ConnectionError, match=r"did not answer within timeout=0\.2 s"):
        judge(ENTRIES, RESPONSES, base_url=server.url, model="m", max_retries=0, timeout=0.2, progress=False)
    assert len(server.requests) == 1


def test_judge_unknown_model_or_path_is_a_value_error(serve):
    server = serve(lambda i, body: 404)
    with pytest.raises(ValueError, match=r"404 for model='no-such-model'.*ollama pull no-such-model"):
        judge(ENTRIES, RESPONSES, base_url=server.url, model="no-such-model", **FAST)
    with pytest.raises(ValueError, match="ends with /v1"):        # base_url without /v1
        judge(ENTRIES, RESPONSES, base_url=server.url.removesuffix("/v1"), model="m", **FAST)
    auth = serve(lambda i, body: 401)
    with pytest.raises(ValueError, match="api_key"):
        judge(ENTRIES, RESPONSES, base_url=auth.url, model="m", api_key="wrong", **FAST)


def test_judge_nothing_scored():
    result = JudgeResult(scores=[None, None], replies=["?", None], errors=[None, "HTTP 500: x"])
    assert math.isnan(result.mean) and result.count == 0 and result.failed == 1 and result.unparsed == 1
    assert result.as_dict()["mean"] is None


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(responses=RESPONSES[:2]), ValueError, "3 entries and 2 responses"),
    (dict(entries=[{"input": "x", "output": "y"}], responses=["z"]), ValueError, r"entries\[0\] has no 'instruction'"),
    (dict(entries=[{"instruction": "x"}], responses=["z"]), ValueError, r"entries\[0\] has no 'output'"),
    (dict(entries=[{"instruction": 1, "output": "y"}], responses=["z"]), TypeError, r"entries\[0\]\['instruction'\]"),
    (dict(entries=["a question"], responses=["z"]), TypeError, r"entries\[0\] must be a dict"),
    (dict(entries=ENTRIES[0], responses=RESPONSES[0]), TypeError, "entries must be a list"),
    (dict(responses="abc"), TypeError, "responses must be a list of strings"),
    (dict(entries=[], responses=[]), ValueError, "entries is empty"),
    (dict(base_url=""), ValueError, "base_url is empty"),
    (dict(base_url="  "), ValueError, "base_url is empty"),
    (dict(base_url=None), TypeError, "base_url must be a string"),
    (dict(base_url="localhost:11434/v1"), ValueError, "base_url must start with http"),
    (dict(model=""), ValueError, "model must be"),
    (dict(max_retries=-1), ValueError, "max_retries"),
    (dict(timeout=0), ValueError, "timeout must be a finite number > 0"),
    (dict(prompt_template="Rate {response} against {reference}."), ValueError, r"must contain \{instruction\}"),
    (dict(prompt_template="{instruction} {reference} {response} {extra}"), ValueError, "only the fields"),
    (dict(progress="yes"), TypeError, "progress"),
])
def test_judge_bad_input(kwargs, error, match):
    args = dict(entries=ENTRIES, responses=RESPONSES, base_url="http://127.0.0.1:9/v1", model="m")
    args.update(kwargs)
    entries, responses = args.pop("entries"), args.pop("responses")
    with pytest.raises(error, match=match):
        judge(entries, responses, **args)


# --------------------------------------------------------------------------- #
# Response loss
# --------------------------------------------------------------------------- #
LOSS_ENTRIES = [
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"instruction": "Say hi.", "input": "", "output": "Hi there, nice to meet you!"},
]


@pytest.fixture(scope="module")
def tok():
    return tiktoken_gpt2()


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = GPTModel(get_config("gpt-tiny").replace(context_length=96, drop_rate=0.3))
    model.train()                          # response_loss must switch dropout off, then restore this
    return model


def hand_response_nll(model, tok, entries, style, max_positions=None):
    """Sum of -log p(token | everything before it) over each response's tokens and its end-of-text,
    one unpadded row at a time; only targets at input positions < ``max_positions`` count."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for entry in entries:
            prompt = tok.encode_ordinary(format_prompt(entry, style))
            ids = prompt + tok.encode_ordinary(entry["output"]) + [50256]
            logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]])).double()[0], dim=-1)   # [T, V]
            for t in range(len(prompt), len(ids)):   # token t is predicted at input position t - 1
                if max_positions is not None and t - 1 >= max_positions:
                    break
                total -= logprobs[t - 1, ids[t]].item()
                count += 1
    return total, count


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_response_loss_equals_hand_computation(tiny_model, tok, style):
    total, count = hand_response_nll(tiny_model, tok, LOSS_ENTRIES, style)
    tiny_model.train()
    out = response_loss(tiny_model, LOSS_ENTRIES, tok, style=style, batch_size=2)
    assert tiny_model.training                                     # its mode is put back
    assert out["tokens"] == count and out["examples"] == 3
    assert out["loss"] == pytest.approx(total / count, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # Averaged over tokens, not batches: the batch size does not change it.
    for batch_size in (1, 3, 8):
        assert response_loss(tiny_model, LOSS_ENTRIES, tok, style=style, batch_size=batch_size)["loss"] \
            == pytest.approx(out["loss"], rel=1e-5)


def test_response_loss_truncation(tiny_model, tok):
    prompts = [len(tok.encode_ordinary(format_prompt(e))) for e in LOSS_ENTRIES]
    limit = max(prompts) + 2                      # the longest prompt keeps two response targets
    total, count = hand_response_nll(tiny_model, tok, LOSS_ENTRIES, "alpaca", max_positions=limit)
    out = response_loss(tiny_model, LOSS_ENTRIES, tok, allowed_max_length=limit)
    assert out["tokens"] == count
    assert out["loss"] == pytest.approx(total / count, rel=1e-5)
    with pytest.raises(ValueError, match="no response token fits in allowed_max_length"):
        response_loss(tiny_model, LOSS_ENTRIES, tok, allowed_max_length=min(prompts) - 1)


def test_response_loss_bad_input(tiny_model, tok):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        response_loss("gpt", LOSS_ENTRIES, tok)
    with pytest.raises(ValueError, match="batch_size"):
        response_loss(tiny_model, LOSS_ENTRIES, tok, batch_size=0)
    with pytest.raises(ValueError, match="allowed_max_length"):
        response_loss(tiny_model, LOSS_ENTRIES, tok, allowed_max_length=0)
    with pytest.raises(ValueError, match="empty"):
        response_loss(tiny_model, [], tok)
    with pytest.raises(ValueError, match="'instruction'"):
        response_loss(tiny_model, [{"output": "x"}], tok)
    with pytest.raises(ValueError, match="style"):
        response_loss(tiny_model, LOSS_ENTRIES, tok, style="chatml")
    with pytest.raises(ValueError, match="'nonsense'.*is not a device name"):    # torch's RuntimeError before
        response_loss(tiny_model, LOSS_ENTRIES, tok, device="nonsense")
    with pytest.raises(ValueError, match="no parameters.*device="):               # a bare StopIteration before
        response_loss(torch.nn.Identity(), LOSS_ENTRIES, tok)
