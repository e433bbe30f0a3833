"""Joining a Ray cluster from a command (`flm cluster train`, `flm tune`): fail in seconds with a one-line error when
nothing answers, and say whether this call connected (so the command shuts Ray down again)."""

from __future__ import annotations

import socket

from flm.config import FLMConfigError


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when nothing listens at a host:port address."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise FLMConfigError(f"--address: nothing answers at {address} ({e.strerror or e}); start the cluster "
                             f"(ray start --head) or fix the address") from None


def connect(address: str | None) -> bool:
    """Join the Ray cluster at `address` (None: start a local one) unless this process is connected already;
    True when this call connected, so the caller shuts Ray down again."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        check_reachable(address)
    try:
        ray.init(address=address or "local")
    except ConnectionError as e:
        raise FLMConfigError(f"--address: cannot connect to a Ray cluster at {address} ({e})") from None
    return True
