"""`loquetier demo`: fine-tune while serving, end to end on the CPU, with nothing downloaded.

It builds a tiny random Llama and the package's tiny tokenizer, starts the server on loopback,
uploads a small task through the official OpenAI client, and creates a fine-tuning job while other
threads keep sending requests to the base model and to a second adapter. When the job succeeds it
asks base and fine-tuned model the held-out questions and prints both answers side by side.

The task is a digit cipher, "417>" -> "528" (every digit plus one, mod 10): a random base model
cannot do it, and a LoRA adapter learns the rule (not a lookup table), so questions it never saw
are answered correctly too.
"""

from __future__ import annotations

import random
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import tiny

BASE_NAME = "tiny-llama"
DIGITS = 3
N_TRAIN, N_HELD_OUT, N_SHOWN = 200, 50, 10


@dataclass
class DemoResult:
    base_accuracy: float
    fine_tuned_accuracy: float
    requests_served: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def cipher_examples(n: int, seed: int) -> list[dict]:
    """n distinct `{"prompt": "417>", "completion": "528"}` problems drawn without replacement."""
    numbers = random.Random(seed).sample(range(10 ** DIGITS), n)
    examples = []
    for number in numbers:
        digits = f"{number:0{DIGITS}d}"
        examples.append({"prompt": f"{digits}>", "completion": "".join(str((int(d) + 1) % 10) for d in digits)})
    return examples


def build_tiny_model(out: Path, seed: int = 0, hidden: int = 64) -> None:
    """A 2-layer random Llama over the tiny tokenizer's vocabulary, saved with transformers."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=tiny.VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        # LoRA cannot train lm_head, and with HF's default std 0.02 the logits of a unit-norm hidden
        # state stay within about +-1, too flat to ever be confident; scale it to std 1/sqrt(hidden).
        model.lm_head.weight.normal_(0.0, hidden ** -0.5)
    model.save_pretrained(out)
    tiny.build_tokenizer(out)


def write_random_adapter(base: Path, out: Path, seed: int = 1) -> None:
    """A random rank-8 PEFT adapter: the "other tenant" the demo keeps serving during training."""
    import torch

    from .lora.adapter import LoraSpec, new_adapter, save_peft_adapter
    from .models.config import ModelArgs
    weights = new_adapter(LoraSpec(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                          ModelArgs.from_dir(base), 8, seed)
    gen = torch.Generator().manual_seed(seed)
    for key, (a, b) in weights.modules.items():
        weights.modules[key] = (a, torch.randn(b.shape, generator=gen) * 0.1)
    save_peft_adapter(weights, out, str(base))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn running the app in a background thread of this process."""

    def __init__(self, app, port: int):
        import uvicorn
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("the demo server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _traffic(client, model: str, stop: threading.Event, served: list[int], seed: int) -> None:
    """Keep one client busy with short completions until told to stop."""
    rng = random.Random(seed)
    while not stop.is_set():
        prompt = rng.choice(["Hello, how are you?", "Tell me a story", "The answer is", "12+7="])
        client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0.8)
        served[0] += 1


def accuracy(client, model: str, examples: list[dict]) -> tuple[float, list[str]]:
    """Greedy answers to every prompt in one batched request; exact-match accuracy."""
    resp = client.completions.create(model=model, prompt=[e["prompt"] for e in examples], max_tokens=DIGITS + 1,
                                     temperature=0)
    answers = [c.text.strip() for c in sorted(resp.choices, key=lambda c: c.index)]
    return sum(a == e["completion"] for a, e in zip(answers, examples)) / len(examples), answers


def run_demo(workdir: str | None = None, port: int = 0, epochs: int = 6, seed: int = 0,
             echo=print) -> DemoResult:
    """Run the whole demo; returns the numbers it prints."""
    import openai
    import torch

    from .server.app import create_app
    from .server.config import ServerConfig

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    # the matrices are tiny: extra intra-op threads only fight the server's and clients' threads (3x slower)
    torch.set_num_threads(1)
    tmp = None if workdir else tempfile.TemporaryDirectory(prefix="loquetier-demo-")
    root = Path(workdir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    try:
        echo(f"[{time.perf_counter() - t0:5.1f}s] building a tiny random Llama and tokenizer in {root}")
        build_tiny_model(root / "model", seed)
        write_random_adapter(root / "model", root / "other-adapter", seed + 1)
        examples = cipher_examples(N_TRAIN + N_HELD_OUT, seed)
        train, held_out = examples[:N_TRAIN], examples[N_TRAIN:]
        tiny.write_jsonl(train, root / "train.jsonl")

        config = ServerConfig(model=str(root / "model"), served_model_name=BASE_NAME,
                              adapters={"other-adapter": str(root / "other-adapter")}, data_dir=str(root / "data"),
                              max_lora_rank=32, max_loras=4, num_kv_blocks=512, base_learning_rate=1e-2, seed=seed)
        app = create_app(config)
        port = port or free_port()
        with ServerThread(app, port):
            echo(f"[{time.perf_counter() - t0:5.1f}s] server up on http://127.0.0.1:{port}/v1")
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo", max_retries=0)
            upload = client.files.create(file=(root / "train.jsonl").open("rb"), purpose="fine-tune")
            echo(f"[{time.perf_counter() - t0:5.1f}s] uploaded {len(train)} examples like "
                 f"{train[0]['prompt']!r} -> {train[0]['completion']!r} as {upload.id}")

            stop, served = threading.Event(), [0]
            workers = [threading.Thread(target=_traffic, args=(client, m, stop, served, i), daemon=True)
                       for i, m in enumerate([BASE_NAME, "other-adapter"] * 2)]
            for w in workers:
                w.start()
            job = client.fine_tuning.jobs.create(
                model=BASE_NAME, training_file=upload.id, suffix="cipher", seed=seed,
                hyperparameters={"n_epochs": epochs, "batch_size": 8, "learning_rate_multiplier": 1.0},
                extra_body={"lora": {"r": 32, "alpha": 32, "target_modules": ["all-linear"]}})
            echo(f"[{time.perf_counter() - t0:5.1f}s] fine-tuning job {job.id} started "
                 f"(LoRA r=32 on all linear layers, lr 1e-2, {epochs} epochs, batch 8)")
            last_report = 0.0
            while job.status not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.25)
                job = client.fine_tuning.jobs.retrieve(job.id)
                if time.perf_counter() - last_report > 1.0:
                    last_report = time.perf_counter()
                    metric = next((e for e in client.fine_tuning.jobs.list_events(job.id, limit=5).data
                                   if e.type == "metrics"), None)
                    if metric is not None:
                        echo(f"[{time.perf_counter() - t0:5.1f}s]   {metric.message}; "
                             f"{served[0]} requests served meanwhile")
            stop.set()
            for w in workers:
                w.join(30)
            if job.status != "succeeded":
                raise RuntimeError(f"the fine-tuning job {job.status}: {job.error}")
            events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
            losses = [e.data["train_loss"] for e in reversed(events) if e.type == "metrics"]
            echo(f"[{time.perf_counter() - t0:5.1f}s] job succeeded: serving {job.fine_tuned_model}")

            base_acc, base_answers = accuracy(client, BASE_NAME, held_out)
            ft_acc, ft_answers = accuracy(client, job.fine_tuned_model, held_out)
        result = DemoResult(base_acc, ft_acc, served[0], losses, time.perf_counter() - t0)
        _report(echo, held_out, base_answers, ft_answers, result, job.fine_tuned_model)
        return result
    finally:
        torch.set_num_threads(threads)
        if tmp is not None:
            tmp.cleanup()


def _report(echo, held_out, base_answers, ft_answers, result: DemoResult, ft_name: str) -> None:
    echo("")
    echo(f"Held-out questions (never in the training file), first {N_SHOWN} of {len(held_out)}:")
    echo(f"  {'prompt':<8} {'expected':<9} {'base model':<12} {'fine-tuned':<12}")
    for ex, b, f in list(zip(held_out, base_answers, ft_answers))[:N_SHOWN]:
        mark = "ok" if f == ex["completion"] else "x"
        echo(f"  {ex['prompt']:<8} {ex['completion']:<9} {b!r:<12} {f!r:<12} {mark}")
    losses = result.losses
    if losses:
        k = max(1, len(losses) // 8)
        curve = " ".join(f"{x:.2f}" for x in losses[::k])
        echo(f"\nTraining loss over {len(losses)} steps: {curve} ... {losses[-1]:.3f} (min {min(losses):.3f})")
    echo(f"Requests served to '{BASE_NAME}' and 'other-adapter' while training: {result.requests_served}")
    echo(f"Held-out exact-match accuracy: base {result.base_accuracy:.0%}, {ft_name} {result.fine_tuned_accuracy:.0%}")
    echo(f"Demo finished in {result.seconds:.0f}s.")
