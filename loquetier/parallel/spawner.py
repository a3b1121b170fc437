"""Starting worker processes: a helper interpreter imports the engine once, then forks each worker.

A fresh interpreter per worker spends seconds importing torch and building its first model (lazy
imports), several processes at once on a small machine more. The helper (`python -m
loquetier.parallel.spawner`, one per rank-0 process, started on first use) has them warm, never
touches CUDA or runs a kernel (so its forked children may), and exits when rank 0 closes its pipe.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback


class Spawner:
    """Rank 0's handle on the helper: `start(spec)` forks a worker there and returns its pid."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "loquetier.parallel.spawner"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def start(self, spec: dict) -> int:
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the tensor-parallel process spawner exited (status {self.proc.wait()})")
        return int(line)


_spawner: Spawner | None = None


def spawner() -> Spawner:
    global _spawner
    if _spawner is None or _spawner.proc.poll() is not None:
        _spawner = Spawner()
    return _spawner


def alive(pid: int) -> bool:
    """Whether a worker still runs (the helper reaps its children as they exit)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _warm() -> None:
    """Import what a worker imports and build a model on the meta device (which imports the rest)."""
    import torch

    from ..engine import engine  # noqa: F401
    from ..models.config import ModelArgs
    from ..models.llama import LlamaModel
    from . import worker  # noqa: F401
    with torch.device("meta"):
        LlamaModel(ModelArgs("llama", 8, 8, 8, 1, 1, 1, 8), 1, 1).to(torch.bfloat16)


def _reap(signum, frame) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main() -> None:
    _warm()
    signal.signal(signal.SIGCHLD, _reap)
    for line in sys.stdin:
        spec = json.loads(line)
        pid = os.fork()
        if pid == 0:   # the worker: off the helper's pipes, with the default signal handlers
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(2, 1)
            status = 0
            try:
                from .worker import run
                run(spec)
            except BaseException:
                traceback.print_exc()
                status = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        print(pid, flush=True)


if __name__ == "__main__":
    main()
