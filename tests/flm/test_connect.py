"""flm/connect.py: the one address rule, and a cluster that does not answer failing in seconds with one line."""

import time

import pytest
import ray

from flm.config import FLMConfigError
from flm.connect import connect, ray_address


def test_the_address_is_explicit_then_ray_address_then_local(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(None) == "local"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_address(None) == "10.0.0.1:6379"
    assert ray_address("auto") == "auto"


@pytest.mark.parametrize("env", [False, True], ids=["--address", "RAY_ADDRESS"])
def test_nothing_answering_fails_in_seconds_naming_where_the_address_came_from(monkeypatch, env):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    t0 = time.perf_counter()
    with pytest.raises(FLMConfigError, match=r"^\$RAY_ADDRESS: nothing answers at 127.0.0.1:1" if env else
                       r"^--address: nothing answers at 127.0.0.1:9"):
        connect(ray, None if env else "127.0.0.1:9")
    assert time.perf_counter() - t0 < 5 and not ray.is_initialized()
