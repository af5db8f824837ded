"""Real servers for integration tests: a free port, start, wait until ready, stop."""

import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, proc, log_path, timeout=120):
    """Poll ``url`` until it answers; fail with the server's log if it dies or times out."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            assert proc.poll() is None, Path(log_path).read_text()[-3000:]
            assert time.time() < deadline, f"{url} did not answer in {timeout} s"
            time.sleep(0.3)


def stop(proc):
    """Terminate, and kill after 20 s; always reap the process (an unreaped Popen warns, and
    warnings are errors here)."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


@contextmanager
def running(cmd, ready_url, log_path, *, env=None, cwd=None, timeout=120):
    """Start ``cmd`` (output to ``log_path``), wait until ``ready_url`` answers, yield the
    process; always stop it and close its log."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(ready_url, proc, log_path, timeout)
            yield proc
        finally:
            stop(proc)
