"""lm-evaluation-harness's ``local-completions`` client against the course's server: log-likelihoods, rolling
log-likelihoods (perplexity) and generation equal the model's own, computed here by a forward pass.

lm-eval is not a dependency of the course (it is large): the test is skipped without it. To run it:
``pip install "lm-eval[api]"``. It was run on 2026-12-07 with lm-eval 0.4.13 and passed.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("aiohttp")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402

from course_lib.config import get_config  # noqa: E402
from course_lib.engine import Engine  # noqa: E402
from course_lib.inference import generate  # noqa: E402
from course_lib.model import GPTModel  # noqa: E402
from course_lib.serve import running_server  # noqa: E402
from course_lib.tokenizers import tiktoken_gpt2  # noqa: E402


@pytest.fixture(scope="module")
def served():
    """``(lm, model, tokenizer)``: lm-eval's client for a server of a small random GPT named "gpt2" (so that
    lm-eval's tiktoken backend picks GPT-2's encoding), and an untouched copy of the model."""
    torch.manual_seed(0)
    model = GPTModel(get_config("gpt-tiny", context_length=256)).eval()
    with Engine(copy.deepcopy(model), name="gpt2") as engine, running_server(engine) as url:
        lm = LocalCompletionsAPI(base_url=url + "/completions", model="gpt2", tokenizer_backend="tiktoken",
                                 tokenized_requests=True, num_concurrent=1, max_retries=1, max_length=256)
        yield lm, model, tiktoken_gpt2()


def _logp(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)      # [T, V]


def test_loglikelihood_equals_the_models(served):
    lm, model, tok = served
    pairs = [("The cat", " sat on the mat."), ("Once upon a time", " there was a dragon"), ("2 + 2 =", " 4")]
    got = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
                            for i, p in enumerate(pairs)], disable_tqdm=True)
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        a, b = tok.encode(context), tok.encode(continuation)
        logp = _logp(model, a + b)
        rows = [logp[len(a) - 1 + k] for k in range(len(b))]
        assert ll == pytest.approx(sum(float(r[t]) for r, t in zip(rows, b)), abs=1e-3)
        assert greedy == all(int(r.argmax()) == t for r, t in zip(rows, b))
    # a continuation that is the model's own greedy text is "greedy" for lm-eval too
    a = tok.encode("Once upon a time")
    new = generate(model, torch.tensor([a]), 3, temperature=0)[0, len(a):].tolist()
    assert tok.encode(tok.decode(new)) == new                    # lm-eval reads the text back as these tokens
    (_, greedy), = lm.loglikelihood([Instance(request_type="loglikelihood", doc={},
                                              arguments=("Once upon a time", tok.decode(new)), idx=0)],
                                    disable_tqdm=True)
    assert greedy


def test_rolling_loglikelihood_and_generation_equal_the_models(served):
    lm, model, tok = served
    text = "It was a bright cold day in April, and the clocks were striking thirteen."
    got = lm.loglikelihood_rolling([Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)],
                                   disable_tqdm=True)[0]
    ids = [50256, *tok.encode(text)]                             # lm-eval starts the text after <|endoftext|>
    logp = _logp(model, ids)
    assert got == pytest.approx(sum(float(logp[k, ids[k + 1]]) for k in range(len(ids) - 1)), abs=1e-3)
    out = lm.generate_until([Instance(request_type="generate_until", doc={},
                                      arguments=("Once upon a time", {"until": ["\n\n"], "max_gen_toks": 12}), idx=0)],
                            disable_tqdm=True)[0]
    a = tok.encode("Once upon a time")
    new = generate(model, torch.tensor([a]), 12, temperature=0)[0, len(a):].tolist()
    new = new[:new.index(50256)] if 50256 in new else new
    assert out == tok.decode(new).split("\n\n")[0]
