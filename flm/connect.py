"""Joining a Ray cluster: the one way every process of ours connects (`flm cluster train`, `flm tune`, `flm serve`,
`service.app.deploy`, the gateway's deployment jobs, the tests).

- Address: the caller's (`--address`), else $RAY_ADDRESS (Ray sets it inside a Ray Job), else "local": a new
  cluster of this process, never a stray one found on the machine.
- Unreachable: a host:port where nothing listens fails in seconds (not after Ray's minutes of retries), and so
  does a refused connection: FLMConfigError, i.e. one line and exit 2 from a command.
- Token auth: Ray reads the token itself (RAY_AUTH_MODE=token with RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
  ~/.ray/auth_token). A missing or wrong token is no error of its own in Ray 2.60: its GCS client logs
  "Unauthenticated" and `ray.init` raises ConnectionError after ~20 s of retries (measured against a token-auth
  head), so the FLMConfigError of a refused connection says how to give the token. No token is guessed: sending
  `flm up`'s token to another cluster would give it away.

Why here, taking the caller's `ray` module: cluster/ and service/ both connect and may not import each other, and
flm/ is the one package below both; flm imports no Ray (tests/test_imports.py: it installs and imports without
it), so the caller, which has imported Ray already, hands the module in.
"""

from __future__ import annotations

import os
import socket
from types import ModuleType

from flm.config import FLMConfigError


def ray_address(address: str | None = None) -> str:
    """The cluster to join: `address`, else $RAY_ADDRESS, else "local" (start one in this process)."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def check_reachable(address: str, timeout_s: float = 5.0, what: str = "--address") -> None:
    """Fail in seconds, not after Ray's minutes of retries, when nothing listens at a host:port address (`what`
    names where the address came from)."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local", or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise FLMConfigError(f"{what}: nothing answers at {address} ({e.strerror or e}); start the cluster "
                             f"(ray start --head, flm up) or fix the address") from None


def connect(ray: ModuleType, address: str | None = None, *, log_to_driver: bool = True, **options) -> bool:
    """Join the Ray cluster at `ray_address(address)` unless this process is connected already; True when this
    call connected, so the caller shuts Ray down again. `ray` is the caller's `import ray`; `log_to_driver=False`
    keeps the workers' output out of this process's (a job's log, a test's); `options` go to `ray.init` (a local
    cluster's num_cpus, ...)."""
    if ray.is_initialized():
        return False
    where = ray_address(address)
    what = "--address" if address or not os.environ.get("RAY_ADDRESS") else "$RAY_ADDRESS"
    check_reachable(where, what=what)
    try:
        ray.init(address=where, log_to_driver=log_to_driver, **options)
    except ConnectionError as e:
        raise FLMConfigError(f"{what}: cannot connect to a Ray cluster at {where} ({e}); start one (ray start --head, "
                             f"flm up), fix the address, or, if the cluster uses token auth (flm up's does), give "
                             f"this process its token: RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<its token file> "
                             f"(flm up's: $FLM_HOME/stack/ray_auth_token)") from None
    return True
