"""Listeners on 127.0.0.1 only, for what switchkd starts on one node: a private Ray (the closed
loop, multi-worker train-offline, Ray-actor engines), torch.distributed rendezvous stores
(the trainer's process group, the collective weight-sync group) and the free ports they take."""
from __future__ import annotations

import functools
import os
import socket
from datetime import timedelta

from switchkd.rollout.logs import worker_runtime_env

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")

_RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"   # "0": Ray's node IP is 127.0.0.1 (single node)


def init_ray(address: str | None = None, **kwargs) -> None:
    """Join the Ray cluster at ``address``; without one, start a private single-node Ray whose every
    listener is on 127.0.0.1 (no dashboard). Every ``ray.init`` of switchkd is this one.

    ``address="local"``: a new instance even when another Ray runs on this machine (ray.init's
    default would join the last one started, via /tmp/ray/ray_current_cluster). Ray 2.60 turns
    ``_node_ip_address="127.0.0.1"`` into the machine's routable IP (and then its GCS, raylet,
    workers and agents listen on all interfaces or on that IP) unless its cluster mode is off:
    off for the start, the node IP stays 127.0.0.1 and every listener binds there
    (tests/cluster/test_security.py checks the sockets).

    A private Ray's daemons start in process groups of their own (their workers join the raylet's):
    a signal to the caller's process group (`kill -TERM -PGID`, a scheduler) reaches the caller
    alone, which then stops Ray in order. Had it reached the daemons too, Ray would end the caller
    (exit status 1, nothing on stderr) as soon as its raylet was gone, before it could clean up.
    They still die with the caller (Ray's kernel fate-sharing)."""
    import ray
    from ray._private import ray_constants

    routed = worker_runtime_env()   # library output of the workers to the run's log files, when the CLI routes it
    if routed:
        env = kwargs.setdefault("runtime_env", {})
        env["env_vars"] = {**routed["env_vars"], **env.get("env_vars", {})}
        env.setdefault("worker_process_setup_hook", routed["worker_process_setup_hook"])
    if address:
        ray.init(address=address, **kwargs)
        return
    saved_env, saved_flag = os.environ.get(_RAY_LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_RAY_LOOPBACK_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False  # Ray's processes inherit the env
    services, popen = ray._private.services, ray._private.services.ConsolePopen
    if ray._private.utils.detect_fate_sharing_support():   # as Ray itself does on Windows
        services.ConsolePopen = functools.partial(popen, process_group=0)
    try:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
    finally:
        services.ConsolePopen = popen
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_RAY_LOOPBACK_ENV, None)
        else:
            os.environ[_RAY_LOOPBACK_ENV] = saved_env


def tcp_store(host: str, port: int, world: int, is_master: bool, timeout_s: float):
    """A torch.distributed TCPStore. torch's master listens on every interface whatever ``host``
    says; for a loopback ``host`` it gets a socket bound to 127.0.0.1 instead (``master_listen_fd``)."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if not (is_master and host in LOOPBACK_HOSTS):
        return dist.TCPStore(host, port, world, is_master, timeout)
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return dist.TCPStore(host, port, world, True, timeout, master_listen_fd=sock.detach())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it); "" probes every interface."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
