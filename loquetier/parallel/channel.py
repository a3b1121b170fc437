"""The control channel: rank 0 sends each step's plan to every worker over a Unix socket.

Plain bytes of int64 arrays (`plan.pack`), no pickling; sockets have no timeout, so an idle engine
keeps its workers, and a worker whose rank 0 is gone sees the connection close and exits.
"""

from __future__ import annotations

import enum
from multiprocessing.connection import Client, Connection, Listener

import numpy as np

from .plan import pack, unpack


class Op(enum.IntEnum):
    STEP = 1              # run a HostBatch (forward, losses, logits; the backward of training rows)
    DECODE = 2            # replay a decode graph
    BUCKETED = 3          # a bucketed step: training rows (and decode rows), maybe a captured graph
    WRITE_SLOT = 4        # an adapter into a slot (its tensors follow by broadcast)
    CLEAR_SLOT = 5
    MAKE_TRAINABLE = 6
    FREEZE = 7
    GATHER_GRADS = 8      # a trained slot's gradients to rank 0 (SplitTrainState)
    PUBLISH = 9           # rank 0's stepped weights of a trained slot into every rank's shard
    ZERO_GRADS = 10
    DROP_TRAIN_GRAPHS = 11
    SHUTDOWN = 12


class LeaderChannel:
    """Rank 0's end: one connection per worker, accepted on a local listener."""

    def __init__(self, authkey: bytes):
        # a Unix socket: no Nagle delay between back-to-back small messages (TCP would hold each
        # until the previous one's delayed ACK), and a path only this host can reach
        self.listener = Listener(family="AF_UNIX", authkey=authkey)
        self.conns: list[Connection] = []

    @property
    def address(self) -> str:
        return self.listener.address

    def accept(self, n: int) -> None:
        self.conns = [self.listener.accept() for _ in range(n)]
        self.listener.close()

    def send(self, op: Op, parts: list[np.ndarray] = ()) -> None:
        data = pack([np.asarray([int(op)]), *parts]).tobytes()
        for conn in self.conns:
            conn.send_bytes(data)

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.conns = []


class WorkerChannel:
    """A worker's end."""

    def __init__(self, address: str, authkey: bytes):
        self.conn = Client(address, family="AF_UNIX", authkey=authkey)

    def recv(self) -> tuple[Op, list[np.ndarray]]:
        op, *parts = unpack(np.frombuffer(bytearray(self.conn.recv_bytes()), dtype=np.int64))
        return Op(int(op[0])), parts
