"""`course adapters merge` and `course export` (step 9), run through ``cli.main`` on tiny random models.

References independent of the commands: ``transformers`` loads what they write and must compute the
logits of our model with its adapter (made by our ``save_adapter``) or of ``peft``'s model (an adapter
``peft`` made); ``gguf``'s reader reads the GGUF file back. Every refusal is one ``error:`` line, exit 2.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
gguf = pytest.importorskip("gguf")

from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from _course import one_error_line  # noqa: E402
from course_lib import cli  # noqa: E402
from course_lib.base_model import load_base_model  # noqa: E402
from course_lib.checkpoint import save_checkpoint  # noqa: E402
from course_lib.config import GPTConfig  # noqa: E402
from course_lib.lora import add_lora, lora_layers, save_adapter  # noqa: E402
from course_lib.model import GPTModel  # noqa: E402
from course_lib.pretrained import hf_to_course_state, load_gpt2  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to True:UserWarning")]

CFG = GPTConfig(vocab_size=101, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=False)
IDX = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def run(capsys, *args):
    status = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def refused(capsys, *args) -> str:
    status, out, err = run(capsys, *args)
    assert status == 2, (out, err)
    return one_error_line(err)


@pytest.fixture
def ours(tmp_path):
    """A tied base model saved as a course checkpoint, and our adapter (attention, ff and the tied head)."""
    torch.manual_seed(0)
    model = GPTModel(CFG, tie_weights=True).eval()
    save_checkpoint(tmp_path / "base" / "model.pt", model)
    add_lora(model, rank=4, alpha=8, targets=["attention", "ff", "head"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].copy_(torch.randn(layer.lora_B["default"].shape, generator=g) * 0.2)
    save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "base", tmp_path / "adapter"


def test_merge_our_adapter_gives_transformers_our_logits(tmp_path, capsys, ours):
    model, base, adapter = ours
    status, out, err = run(capsys, "adapters", "merge", base, adapter, "--out", tmp_path / "merged")
    assert status == 0, err
    assert "merged" in out and str(tmp_path / "merged") in out
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        mine = model(IDX)
        torch.testing.assert_close(hf(IDX).logits, mine, atol=1e-5, rtol=1e-5)
        # the head's adapter was merged into the head alone: the embedding is the base model's
        base_model = GPTModel(CFG, tie_weights=True)
        base_model.load_state_dict(torch.load(base / "model.pt", weights_only=True)["model"])
        torch.testing.assert_close(hf.transformer.wte.weight, base_model.tok_emb.weight, atol=0, rtol=0)
        assert not torch.allclose(hf(IDX).logits, base_model.eval()(IDX), atol=1e-3)   # the adapter did something
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False


def test_merge_a_peft_adapter_gives_peft_logits(tmp_path, capsys):
    torch.manual_seed(0)
    hf_cfg = GPT2Config(vocab_size=CFG.vocab_size, n_positions=CFG.context_length, n_embd=CFG.emb_dim,
                        n_layer=CFG.n_layers, n_head=CFG.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(hf_cfg).save_pretrained(tmp_path / "hf")
    pm = peft.get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "hf"),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                             fan_in_fan_out=True)).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    pm.save_pretrained(tmp_path / "peft")
    status, _, err = run(capsys, "adapters", "merge", tmp_path / "hf", tmp_path / "peft", "--out", tmp_path / "merged")
    assert status == 0, err
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDX).logits, pm(IDX).logits, atol=1e-5, rtol=1e-5)


def test_merge_refusals_are_one_error_line(tmp_path, capsys, ours):
    _, base, adapter = ours
    out = tmp_path / "merged"
    assert "does not exist" in refused(capsys, "adapters", "merge", tmp_path / "nope", adapter, "--out", out)
    assert "adapter folder" in refused(capsys, "adapters", "merge", base, tmp_path / "nope", "--out", out)
    (tmp_path / "empty").mkdir()
    assert "adapter_config.json" in refused(capsys, "adapters", "merge", base, tmp_path / "empty", "--out", out)
    assert "give BASE ADAPTER" in refused(capsys, "adapters", "merge", adapter, "--out", out)
    assert "ADAPTER only" in refused(capsys, "adapters", "merge", "--profile", "tiny", base, adapter, "--out", out)
    # an adapter made for a wider model: the tensor that does not fit is named
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "wide" / "model.pt", GPTModel(CFG.replace(emb_dim=48)))
    err = refused(capsys, "adapters", "merge", tmp_path / "wide", adapter, "--out", out)
    assert re.search(r"tensor 'base_model\.model\.\S+\.lora_A\.weight'.*another base model", err), err
    assert not out.exists()                                   # nothing was written by a refused run
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "--force" in refused(capsys, "adapters", "merge", base, adapter, "--out", out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    status, _, err = run(capsys, "adapters", "merge", base, adapter, "--out", out, "--force")
    assert status == 0, err
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"


def test_export_hf_round_trip_through_transformers(tmp_path, capsys):
    torch.manual_seed(0)
    model = GPTModel(CFG).eval()
    save_checkpoint(tmp_path / "run" / "model.pt", model)
    status, out, err = run(capsys, "export", tmp_path / "run", "--format", "hf", "--out", tmp_path / "hf")
    assert status == 0, err
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDX).logits, model(IDX), atol=1e-5, rtol=1e-5)
    status, _, err = run(capsys, "export", tmp_path / "run", "--format", "hf", "--out", tmp_path / "hf16",
                         "--dtype", "f16")
    assert status == 0, err
    hf16 = GPT2LMHeadModel.from_pretrained(tmp_path / "hf16", dtype=torch.float32).eval()
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["torch_dtype"] == "float16"
    with torch.no_grad():
        torch.testing.assert_close(hf16.transformer.h[0].mlp.c_fc.weight,
                                   model.trf_blocks[0].ff.layers[0].weight.T.half().float(), atol=0, rtol=0)


def test_export_profile_base_as_hf_with_its_tokenizer(tmp_path, capsys):
    status, _, err = run(capsys, "export", "--profile", "tiny", "--format", "hf", "--out", tmp_path / "hf")
    assert status == 0, err
    assert (tmp_path / "hf" / "vocab.json").is_file() and (tmp_path / "hf" / "merges.txt").is_file()
    assert "chat_template" not in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())  # a base model
    base = load_base_model("tiny", device="cpu", verbose=False)
    back = load_gpt2(tmp_path / "hf")
    mine, theirs = base.state_dict(), back.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert all(not theirs[k].any() for k in set(theirs) - set(mine))     # qkv_bias=False: zero biases in GPT-2


CHATS = [
    [{"role": "user", "content": "Add 2 and 3."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "developer", "content": "Use 'single' quotes."}, {"role": "user", "content": "Say it's fine."}],
]


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_export_of_an_instruction_model_carries_its_chat_template(tmp_path, capsys, style):
    """``transformers``' ``apply_chat_template`` on the exported tokenizer gives ``chat_prompt``'s text, and
    the GGUF file holds the same template: vLLM, TGI and llama.cpp format chats as the model was tuned."""
    from course_lib.pretrained import export_hf
    from course_lib.serve import chat_prompt, chat_template

    torch.manual_seed(0)
    model = GPTModel(CFG.replace(vocab_size=50257, emb_dim=16)).eval()
    save_checkpoint(tmp_path / "run" / "model.pt", model, extra={"style": style})
    status, out, err = run(capsys, "export", tmp_path / "run", "--format", "hf", "--out", tmp_path / "hf")
    assert status == 0 and f"with the {style} chat template" in out, err
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for messages in CHATS:
        got = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert got == chat_prompt(messages, style)
    status, _, err = run(capsys, "export", tmp_path / "run", "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert status == 0, err
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.chat_template"].contents() == chat_template(style)
    with pytest.raises(ValueError, match="include_tokenizer=True"):
        export_hf(model, tmp_path / "x", include_tokenizer=False, chat_template=chat_template(style))
    with pytest.raises(TypeError, match="chat_template must be"):
        export_hf(model, tmp_path / "x", chat_template=style.encode())
    with pytest.raises(ValueError, match="style must be one of"):
        chat_template("llama3")


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_merging_an_instruction_adapter_carries_its_chat_template(tmp_path, capsys, style):
    """An adapter saved with its chat template (as ``course finetune instruct --lora`` does): the merged
    folder's tokenizer formats chats as ``chat_prompt``, ``peft`` still reads the adapter folder, and the
    merged folder's GGUF export keeps the template. Without it (a classifier's adapter) none is written."""
    from course_lib.lora import adapter_chat_template
    from course_lib.serve import chat_prompt, chat_template

    torch.manual_seed(0)
    model = GPTModel(CFG.replace(vocab_size=50257, emb_dim=16)).eval()
    save_checkpoint(tmp_path / "base" / "model.pt", model)
    add_lora(model, rank=2, alpha=4)
    save_adapter(model, tmp_path / "adapter", chat_template=chat_template(style))
    assert adapter_chat_template(tmp_path / "adapter") == chat_template(style)
    status, out, err = run(capsys, "adapters", "merge", tmp_path / "base", tmp_path / "adapter",
                           "--out", tmp_path / "merged")
    assert status == 0 and "chat template" in out, err
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    for messages in CHATS:
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            chat_prompt(messages, style)
    peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "merged"), tmp_path / "adapter")
    status, out, err = run(capsys, "export", tmp_path / "merged", "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert status == 0 and "chat template" in out, err
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.chat_template"].contents() == chat_template(style)
    # transformers' own save keeps the template in chat_template.jinja: the export still finds it
    config = json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text())
    (tmp_path / "merged" / "chat_template.jinja").write_text(config.pop("chat_template"))
    (tmp_path / "merged" / "tokenizer_config.json").write_text(json.dumps(config))
    status, out, err = run(capsys, "export", tmp_path / "merged", "--format", "gguf", "--out", tmp_path / "j.gguf")
    assert status == 0 and "chat template" in out, err
    assert gguf.GGUFReader(tmp_path / "j.gguf").fields["tokenizer.chat_template"].contents() == chat_template(style)

    save_adapter(model, tmp_path / "adapter", overwrite=True)          # saved again without: the old one goes
    assert adapter_chat_template(tmp_path / "adapter") is None
    status, out, err = run(capsys, "adapters", "merge", tmp_path / "base", tmp_path / "adapter",
                           "--out", tmp_path / "plain")
    assert status == 0 and "chat template" not in out, err
    assert "chat_template" not in json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
    with pytest.raises(TypeError, match="chat_template must be"):
        save_adapter(model, tmp_path / "other", chat_template=b"{{ x }}")
    with pytest.raises(ValueError, match="chat_template is empty"):
        save_adapter(model, tmp_path / "other", chat_template="  ")
    with pytest.raises(ValueError, match="UTF-8"):
        save_adapter(model, tmp_path / "other", chat_template="ok \udcff")
    assert not (tmp_path / "other").exists()                           # refused before anything was written
    # a template already in the folder without an adapter (a tokenizer saved there) is the learner's: kept
    mine = tmp_path / "shared"
    mine.mkdir()
    (mine / "chat_template.jinja").write_text("MY OWN")
    save_adapter(model, mine)
    assert (mine / "chat_template.jinja").read_text() == "MY OWN"
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "chat_template.jinja").write_text("THEIRS")
    with pytest.raises(FileExistsError, match="chat_template.jinja"):
        save_adapter(model, lone, chat_template=chat_template(style))
    assert [p.name for p in lone.iterdir()] == ["chat_template.jinja"]  # nothing written
    save_adapter(model, mine, overwrite=True)          # replacing the adapter: the template saved with it goes
    assert not (mine / "chat_template.jinja").exists()
    (mine / "chat_template.jinja").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        adapter_chat_template(mine)
    with pytest.raises(ValueError, match="is a folder"):
        save_adapter(model, tmp_path / "shared", overwrite=True, chat_template="x")
    with pytest.raises(ValueError, match="is a file"):
        adapter_chat_template(mine / "adapter_config.json")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "chat_template.jinja").write_text("  \n")
    assert adapter_chat_template(tmp_path / "empty") is None


def test_export_gguf_and_its_refusals(tmp_path, capsys):
    torch.manual_seed(0)
    model = GPTModel(CFG.replace(vocab_size=50257, emb_dim=16)).eval()
    save_checkpoint(tmp_path / "run" / "model.pt", model)
    target = tmp_path / "out" / "model.gguf"
    status, out, err = run(capsys, "export", tmp_path / "run", "--format", "gguf", "--out", target, "--dtype", "f16")
    assert status == 0, err
    reader = gguf.GGUFReader(target)
    assert reader.fields["general.file_type"].contents() == 1
    assert reader.fields["general.name"].contents() == "run"                   # the run folder's name
    up = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    assert torch.equal(torch.from_numpy(up.data.copy()), model.trf_blocks[1].ff.layers[0].weight.detach().half())

    before = target.read_bytes()
    assert "--force" in refused(capsys, "export", tmp_path / "run", "--format", "gguf", "--out", target)
    assert target.read_bytes() == before
    assert "is a folder" in refused(capsys, "export", tmp_path / "run", "--format", "gguf", "--out", tmp_path)
    assert "--format must be hf" in refused(capsys, "export", tmp_path / "run", "--format", "onnx", "--out", target)
    assert "--dtype must be f32 or f16" in refused(capsys, "export", tmp_path / "run", "--format", "gguf",
                                                   "--out", target, "--dtype", "bf16")
    assert "does not exist" in refused(capsys, "export", tmp_path / "nope", "--format", "hf", "--out", tmp_path / "x")
    assert "give MODEL_DIR" in refused(capsys, "export", "--format", "hf", "--out", tmp_path / "x")
    assert "no path" in refused(capsys, "export", tmp_path / "run", "--profile", "tiny", "--format", "hf",
                                "--out", tmp_path / "x")
    save_checkpoint(tmp_path / "small" / "model.pt", GPTModel(CFG))
    assert "fewer than GPT-2's" in refused(capsys, "export", tmp_path / "small", "--format", "gguf",
                                           "--out", tmp_path / "small.gguf")
    assert not (tmp_path / "x").exists() and not (tmp_path / "small.gguf").exists()
    status, _, err = run(capsys, "export", tmp_path / "run", "--format", "gguf", "--out", target, "--force")
    assert status == 0, err
    assert target.read_bytes()[:4] == b"GGUF" and target.stat().st_size > len(before)   # f32 now: replaced


def test_cli_choices_are_the_librarys():
    from course_lib.export import GGUF_DTYPES

    assert cli._EXPORT_DTYPES == GGUF_DTYPES
