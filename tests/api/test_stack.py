"""api.stack.stop_processes on real processes: what `flm down` reports, and that it kills only what it started."""

import subprocess
import sys
import time

import pytest

from api.stack import alive, stop_processes

# a stand-in for the gateway (stop_processes checks that the command line names api.server): it starts a child that
# ignores SIGTERM (as a process stuck in a syscall or a signal handler would), then waits for its own SIGTERM
PARENT = """# api.server
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "print('ready', flush=True); time.sleep(600)"] if sys.argv[1] == "stubborn" else
                         [sys.executable, "-c", "print('ready', flush=True); import time; time.sleep(600)"],
                         stdout=subprocess.PIPE, start_new_session=sys.argv[1] == "stubborn")
signal.signal(signal.SIGTERM, lambda *_: (child.terminate(), sys.exit(0)))
print(child.pid, child.stdout.readline().decode().strip(), flush=True)
time.sleep(600)
"""


def start(kind: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", PARENT, kind], stdout=subprocess.PIPE)
    child, ready = proc.stdout.readline().decode().split()
    assert ready == "ready"
    return proc, int(child)


@pytest.mark.parametrize("kind", ["stubborn", "cooperative"])
def test_stop_names_what_had_to_be_killed(kind):
    proc, child = start(kind)
    t0 = time.perf_counter()
    # the cooperative tree's grace is long so that a loaded machine cannot make it look stubborn; it costs nothing
    # (stop_processes returns as soon as the tree is gone)
    stopped = stop_processes({"gateway": {"pid": proc.pid}}, grace_s=2 if kind == "stubborn" else 30)
    took = time.perf_counter() - t0
    proc.wait(5)
    if kind == "stubborn":  # the child ignored its SIGTERM (its parent's handler sent one): killed at the grace's end
        [line] = stopped
        # stop_processes keeps a command line's first 100 characters: how much of the script that leaves depends on
        # the length of the interpreter's path (CI's checkout path is longer than ours)
        command = f"{sys.executable} -c import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)"
        assert line.startswith(f"gateway (PID {proc.pid}; SIGKILLed after 2 s: {child} {command[:100]}"), line
        assert 2 <= took < 5
    else:
        assert stopped == [f"gateway (PID {proc.pid})"]
    deadline = time.monotonic() + 5
    while alive(child):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_stop_leaves_a_process_that_is_not_ours_alone():
    """A recorded PID whose command line is not the gateway's (the PID reused after a reboot) is not signalled."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        assert stop_processes({"gateway": {"pid": other.pid}}, grace_s=1) == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
