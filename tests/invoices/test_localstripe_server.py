"""billing_site.localstripe_server: `make run`'s fake Stripe keeps its state in a file of its own,
written whole, and starts even when that file was left broken."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

AUTH = {"Authorization": "Bearer sk_test_x"}


@contextmanager
def _server(state):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "billing_site.localstripe_server",
        "--port",
        str(port),
        "--state",
        str(state),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # noqa: S603
    base = f"http://127.0.0.1:{port}/v1/customers"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(base, headers=AUTH), timeout=1)  # noqa: S310
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "localstripe did not answer"
                time.sleep(0.1)
        yield base, proc
    finally:
        proc.terminate()
        proc.wait(10)


def _customers(base: str) -> list[str]:
    with urllib.request.urlopen(urllib.request.Request(base, headers=AUTH), timeout=5) as answer:  # noqa: S310
        return [c["email"] for c in json.load(answer)["data"]]


def test_a_broken_state_file_is_moved_aside_and_the_server_starts_empty(tmp_path):
    state = tmp_path / "state.pickle"
    state.write_bytes(b"\x80\x05\x95 truncated")
    with _server(state) as (base, proc):
        assert _customers(base) == []
    assert (tmp_path / "state.pickle.unreadable").read_bytes() == b"\x80\x05\x95 truncated"
    assert "could not be read" in proc.stderr.read()


def test_the_state_survives_a_restart_and_no_temporary_file_is_left(tmp_path):
    state = tmp_path / "state.pickle"
    with _server(state) as (base, _):
        request = urllib.request.Request(base, data=b"email=kept%40example.com", headers=AUTH)
        urllib.request.urlopen(request, timeout=5)  # noqa: S310
    with _server(state) as (base, _):
        assert _customers(base) == ["kept@example.com"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pickle"]
