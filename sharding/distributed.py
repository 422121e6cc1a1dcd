"""Multi-host serving: ``jax.distributed`` plus a lockstep control channel.

Every process (``--nnodes N``, ``--node-rank i``, ``--dist-init-addr
HOST:PORT``, SGLang's names) joins one ``jax.distributed`` runtime and builds
the same ``LLMEngine`` over the global ``(data, tensor)`` mesh: each process
loads only its own shards. Rank 0 (the leader) serves HTTP; its runner's
compiled steps are wrapped so that, before each launch, the step's host
inputs (token ids, attention metadata, sampling tensors: small numpy arrays)
are sent to every follower over a TCP control channel on ``PORT + 1``.
Followers run the very same jitted step with those inputs, so all processes
execute the same SPMD program in lockstep (XLA's collectives run over gloo on
CPU, NCCL on GPU).

After each launch the leader waits for every follower's acknowledgement (sent
once the follower's step finished). A follower that died or stopped
answering within ``step_timeout`` seconds makes that step raise
``FollowerLostError``; the engine fails the step's requests with its message,
and every later step fails at once with the same error instead of hanging.
"""

from __future__ import annotations

import logging
import pickle
import socket
import struct
import time
from typing import Optional

import jax

logger = logging.getLogger(__name__)

STEP_NAMES = ("_step", "_step_plp")


class FollowerLostError(RuntimeError):
    """A follower process died or stopped answering; multi-host steps cannot run."""


def initialize(nnodes: int, node_rank: int, dist_init_addr: str,
               heartbeat_timeout_seconds: int = 30) -> None:
    """Joins the ``jax.distributed`` runtime (before anything else touches jax).

    Sets gloo as the CPU collectives implementation and turns on
    ``jax_enable_recoverability`` so a dead peer surfaces as errors in the
    survivors rather than terminating them.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(coordinator_address=dist_init_addr, num_processes=nnodes,
                               process_id=node_rank,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    logger.info("jax.distributed: process %d/%d, %d global devices (%d local)", node_rank,
                nnodes, jax.device_count(), jax.local_device_count())


def control_address(dist_init_addr: str) -> tuple[str, int]:
    """The control channel's ``(host, port)``: the coordinator's port + 1."""
    host, port = dist_init_addr.rsplit(":", 1)
    return host, int(port) + 1


def _send(sock: socket.socket, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(struct.pack("!Q", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket):
    (n,) = struct.unpack("!Q", _recv_exact(sock, 8))
    return pickle.loads(_recv_exact(sock, n))


class Leader:
    """Rank 0's end of the control channel; wraps a runner's compiled steps.

    Args:
      dist_init_addr: the ``--dist-init-addr`` (the channel listens on port + 1).
      num_followers: ``nnodes - 1``.
      step_timeout: seconds to wait for each follower's acknowledgement.
      connect_timeout: seconds to wait for all followers to connect.
    """

    def __init__(self, dist_init_addr: str, num_followers: int, *, step_timeout: float = 120.0,
                 connect_timeout: float = 600.0):
        host, port = control_address(dist_init_addr)
        self.step_timeout = step_timeout
        self.error: Optional[str] = None
        server = socket.create_server(("0.0.0.0" if host not in ("127.0.0.1", "localhost")
                                       else host, port))
        server.settimeout(connect_timeout)
        self.followers: dict[int, socket.socket] = {}
        while len(self.followers) < num_followers:
            conn, _ = server.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rank = _recv(conn)
            self.followers[rank] = conn
            logger.info("follower %d connected", rank)
        server.close()
        self._seq = 0

    def attach(self, runner) -> None:
        """Wraps ``runner._step``/``_step_plp`` so every launch runs on all processes."""
        for name in STEP_NAMES:
            setattr(runner, name, _LeaderStep(self, name, getattr(runner, name)))

    def broadcast(self, name: str, host_args: tuple, kwargs: dict) -> int:
        self._check()
        self._seq += 1
        for rank, conn in self.followers.items():
            try:
                _send(conn, ("step", self._seq, name, host_args, kwargs))
            except OSError as exc:
                self._fail(f"follower node {rank} is unreachable ({exc})")
        return self._seq

    def wait_acks(self, seq: int) -> None:
        deadline = time.monotonic() + self.step_timeout
        for rank, conn in self.followers.items():
            try:
                conn.settimeout(max(deadline - time.monotonic(), 0.01))
                ack = _recv(conn)
            except (OSError, ConnectionError, EOFError) as exc:
                reason = "timed out" if isinstance(exc, socket.timeout) else str(exc)
                self._fail(f"follower node {rank} did not finish step {seq} ({reason})")
            if ack != ("ack", seq):
                self._fail(f"follower node {rank} answered {ack!r} to step {seq}")

    def _check(self) -> None:
        if self.error is not None:
            raise FollowerLostError(self.error)

    def _fail(self, message: str):
        self.error = (f"multi-host engine lost a follower: {message}; restart every node "
                      "of the deployment")
        logger.error(self.error)
        raise FollowerLostError(self.error)

    def close(self) -> None:
        for conn in self.followers.values():
            try:
                _send(conn, ("stop",))
                conn.close()
            except OSError:
                pass


class _LeaderStep:
    """A compiled step that first sends its host inputs to the followers."""

    def __init__(self, leader: Leader, name: str, fn):
        self.leader, self.name, self.fn = leader, name, fn

    def __call__(self, state, kv, *host_args, **kwargs):
        seq = self.leader.broadcast(self.name, host_args, kwargs)
        out = self.fn(state, kv, *host_args, **kwargs)
        self.leader.wait_acks(seq)
        return out


def follow(runner, dist_init_addr: str, rank: int, connect_timeout: float = 600.0) -> None:
    """A follower's main loop: runs every step the leader broadcasts until told to stop.

    Args:
      runner: this process's ``ModelRunner`` (same config and mesh as the leader's).
      dist_init_addr: the ``--dist-init-addr``.
      rank: this process's ``--node-rank``.
    """
    host, port = control_address(dist_init_addr)
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=10)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _send(sock, rank)
    logger.info("follower %d: connected to leader at %s:%d", rank, host, port)
    while True:
        try:
            msg = _recv(sock)
        except (ConnectionError, OSError):
            logger.warning("follower %d: leader closed the control channel; exiting", rank)
            return
        if msg[0] == "stop":
            logger.info("follower %d: stop", rank)
            return
        _, seq, name, host_args, kwargs = msg
        out = getattr(runner, name)(runner.params, runner.kv, *host_args, **kwargs)
        runner.kv = out[-1]
        jax.block_until_ready(out)
        _send(sock, ("ack", seq))


def run_follower(engine, config) -> int:
    """``serving.main`` on a node with rank > 0: precompile, then follow the leader.

    Args:
      engine: this node's ``LLMEngine`` (built from the same config as the leader's).
      config: the ``EngineConfig``.
    """
    if config.precompile:
        engine.runner.precompile(run=False)  # a step alone would wait for the leader
    follow(engine.runner, config.dist_init_addr, config.node_rank)
    return 0
