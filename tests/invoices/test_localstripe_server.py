"""billing_site.localstripe_server: `make run`'s fake Stripe keeps its state in a file of its own,
written whole, and starts even when that file was left broken."""

import json
import urllib.request

from tests.fake_stripe import localstripe_running

AUTH = {"Authorization": "Bearer sk_test_x"}


def _customers(base: str) -> list[str]:
    request = urllib.request.Request(f"{base}/v1/customers", headers=AUTH)
    with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310 (loopback)
        return [c["email"] for c in json.load(answer)["data"]]


def test_a_broken_state_file_is_moved_aside_and_the_server_starts_empty(tmp_path):
    state = tmp_path / "state.pickle"
    state.write_bytes(b"\x80\x05\x95 truncated")
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr, localstripe_running(state=state, stderr=stderr) as base:
        assert _customers(base) == []
    assert (tmp_path / "state.pickle.unreadable").read_bytes() == b"\x80\x05\x95 truncated"
    assert "could not be read" in log.read_text()


def test_the_state_survives_a_restart_and_no_temporary_file_is_left(tmp_path):
    state = tmp_path / "state.pickle"
    with localstripe_running(state=state) as base:
        request = urllib.request.Request(
            f"{base}/v1/customers", data=b"email=kept%40example.com", headers=AUTH
        )
        urllib.request.urlopen(request, timeout=5)  # noqa: S310 (loopback)
    with localstripe_running(state=state) as base:
        assert _customers(base) == ["kept@example.com"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pickle"]
