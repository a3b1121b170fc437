"""Model sources: Hugging Face Hub ids from a cache the test lays out (no network), GGUF files
checked against transformers' own GGUF loading, `dtype auto`, and one-line errors for wrong inputs."""

import logging

import pytest
import torch
from helpers import forward_all, write_checkpoint, write_gguf, write_hub_snapshot, write_model_with_tokenizer

from loquetier import LLM, SamplingParams
from loquetier.cli import main
from loquetier.config import EngineConfig, resolve_dtype
from loquetier.errors import ModelLoadError

MAIN, V2 = "a" * 40, "b" * 40
PROMPT = list(range(5, 30))


def _logits(llm):
    return forward_all(llm.engine, [PROMPT], [None])[0]


def _ref(hf):
    with torch.no_grad():
        return hf(torch.tensor([PROMPT])).logits[0]


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """A Hub cache in HF_HOME with org/tiny at main (seed 0) and at tag v2 (seed 1); offline."""
    main_hf = write_model_with_tokenizer(tmp_path / "src-main", "llama", seed=0)
    v2_hf = write_model_with_tokenizer(tmp_path / "src-v2", "llama", seed=1)
    home = tmp_path / "hf-home"
    write_hub_snapshot(home, "org/tiny", tmp_path / "src-main", MAIN)
    write_hub_snapshot(home, "org/tiny", tmp_path / "src-v2", V2, refs=("v2",))
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return main_hf, v2_hf


def test_hub_id_resolves_from_the_cache_at_each_revision(hub):
    main_hf, v2_hf = hub
    llm = LLM("org/tiny", num_kv_blocks=32)
    assert llm.tokenizer is not None and llm.tokenizer.chat_template
    assert (_logits(llm) - _ref(main_hf)).abs().max().item() <= 1e-4
    for revision in ("v2", V2):     # a tag, and a commit hash
        other = LLM("org/tiny", revision=revision, num_kv_blocks=32)
        assert (_logits(other) - _ref(v2_hf)).abs().max().item() <= 1e-4


def test_hub_misses_are_one_clear_line(hub):
    with pytest.raises(ModelLoadError, match=r"no such model: 'org/absent'.*Hugging Face cache.*HF_HUB_OFFLINE"):
        LLM("org/absent")
    with pytest.raises(ModelLoadError, match=r"at revision 'v3'"):
        LLM("org/tiny", revision="v3")
    with pytest.raises(ModelLoadError, match="no such model: '/no/such/dir' is not a file or directory"):
        LLM("/no/such/dir")


def test_cli_takes_a_hub_id_and_a_revision(hub, capsys):
    assert main(["generate", "org/tiny", "Hello", "--max-tokens", "4", "--revision", "v2"]) == 0
    printed = capsys.readouterr().out
    llm = LLM("org/tiny", revision="v2", num_kv_blocks=32)
    assert printed == llm.generate("Hello", SamplingParams(max_tokens=4, temperature=0))[0].text + "\n"
    capsys.readouterr()
    assert main(["generate", "org/absent", "Hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loquetier generate: error: no such model: 'org/absent'")


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    """A tiny GQA Llama converted to a Q8_0 GGUF (with its tokenizer and chat template), and
    transformers' model loaded from that same file."""
    import transformers
    root = tmp_path_factory.mktemp("gguf")
    hf = write_model_with_tokenizer(root / "hf", "llama")
    (root / "dir").mkdir()
    path = write_gguf(root / "dir" / "tiny-q8_0.gguf", hf, root / "hf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(root / "dir", gguf_file=path.name, dtype=torch.float32)
    return path, ref.eval(), hf


def test_gguf_logits_match_transformers_loading_the_same_file(gguf_model):
    path, ref, original = gguf_model
    for spec in (path, path.parent):   # the file, or a directory holding one
        llm = LLM(str(spec), num_kv_blocks=32)
        assert llm.source.format == "gguf" and llm.engine.dtype == torch.float32
        assert (_logits(llm) - _ref(ref)).abs().max().item() <= 1e-4
    # the weights really are dequantized Q8_0, not the original floats
    assert (_ref(ref) - _ref(original)).abs().max().item() > 1e-4
    greedy = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].token_ids
    assert greedy == ref.generate(torch.tensor([PROMPT]), max_new_tokens=8, min_new_tokens=8,
                                  do_sample=False)[0, len(PROMPT):].tolist()


def test_gguf_tokenizer_and_chat_template_come_from_the_file(gguf_model):
    import transformers

    from loquetier.tiny import CHAT_TEMPLATE
    path, _, _ = gguf_model
    llm = LLM(str(path), num_kv_blocks=32)
    assert llm.tokenizer.chat_template == CHAT_TEMPLATE
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    messages = [{"role": "user", "content": "Hi there"}]
    assert (llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    assert llm.encode("Hello world") == theirs.encode("Hello world")


def test_gguf_dequantizes_to_the_chosen_dtype(gguf_model):
    path, ref, _ = gguf_model
    llm = LLM(str(path), num_kv_blocks=32, dtype="bfloat16")
    assert llm.engine.model.embed_tokens.weight.dtype == torch.bfloat16
    err = ((_logits(llm).float() - _ref(ref)).norm() / _ref(ref).norm()).item()
    assert 0 < err < 0.05


def test_wrong_gguf_inputs(tmp_path, gguf_model):
    path, _, _ = gguf_model
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(path.read_bytes())
    with pytest.raises(ModelLoadError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\)"):
        LLM(str(tmp_path / "two"))
    (tmp_path / "fake.gguf").write_text("not a gguf")
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        LLM(str(tmp_path / "fake.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="neither a config.json"):
        LLM(str(tmp_path / "empty"))


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    import json
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match=r"unsupported architecture.*GPT2LMHeadModel.*supported: "
                                             r"\['LlamaForCausalLM', 'MistralForCausalLM'"):
        LLM(str(tmp_path))


def test_finetune_without_a_tokenizer_is_one_line(tmp_path, capsys):
    write_checkpoint(tmp_path / "model", "llama")          # weights and config, no tokenizer files
    (tmp_path / "data.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    capsys.readouterr()
    code = main(["finetune", str(tmp_path / "model"), str(tmp_path / "data.jsonl"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "has no tokenizer" in err[0] and "fine-tuning needs one" in err[0]


# ---------------------------------------------------------------------------------------------- dtype auto
def test_dtype_auto_follows_vllm(caplog):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert EngineConfig(model="m").dtype == "auto"
    assert resolve_dtype("auto", torch.bfloat16, cpu) == torch.float32     # CPU: float32 always
    assert resolve_dtype("auto", torch.float16, gpu) == torch.float16      # GPU: the checkpoint's own
    assert resolve_dtype("auto", torch.bfloat16, gpu) == torch.bfloat16
    with caplog.at_level(logging.WARNING, logger="loquetier"):
        assert resolve_dtype("auto", torch.float32, gpu) == torch.bfloat16  # fp32 on a GPU: bf16, said so
        assert resolve_dtype("auto", None, gpu) == torch.bfloat16
    assert sum("float32" in r.message and "bfloat16" in r.message for r in caplog.records) == 2
    assert resolve_dtype("float32", torch.bfloat16, gpu) == torch.float32  # an explicit dtype wins
    assert resolve_dtype("fp16", None, cpu) == torch.float16


def test_dtype_auto_reads_the_checkpoint(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, "llama", dtype=torch.bfloat16)
    llm = LLM(str(tmp_path), num_kv_blocks=16)                # CPU: float32 whatever the checkpoint
    assert llm.source.checkpoint_dtype == torch.bfloat16 and llm.engine.dtype == torch.float32
    # on a GPU the checkpoint's bfloat16 is kept: ask for the device the engine would use there
    import loquetier.engine.engine as engine_module
    seen = []
    real = engine_module.resolve_dtype
    monkeypatch.setattr(engine_module, "resolve_dtype",
                        lambda name, stored, device: seen.append(real(name, stored, torch.device("cuda"))) or
                        real(name, stored, device))
    LLM(str(tmp_path), num_kv_blocks=16)
    assert seen == [torch.bfloat16]
