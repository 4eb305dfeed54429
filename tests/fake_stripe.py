"""localstripe for the tests and the soak: a fresh server on a free loopback port, and saved cards
added the way the Payment methods page adds them."""

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

GOOD_CARD = "4242424242424242"
DECLINING_CARD = "4000000000000341"  # localstripe: attaches, then every charge is declined


@contextlib.contextmanager
def localstripe_running(
    startup_seconds: float = 30, state: Path | None = None, stderr: IO | int = subprocess.DEVNULL
) -> Iterator[str]:
    """Starts localstripe (billing_site.localstripe_server) on a free loopback port, its state in
    memory only (a fresh server) or in `state`, yields its base URL once it answers, and stops it
    on the way out."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "billing_site.localstripe_server", "--port", str(port)]
    if state is not None:
        command += ["--state", str(state)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)  # noqa: S603
    base = f"http://127.0.0.1:{port}"
    probe_request = urllib.request.Request(
        f"{base}/v1/customers", headers={"Authorization": "Bearer sk_test_x"}
    )
    deadline = time.monotonic() + startup_seconds
    try:
        while True:
            try:
                with urllib.request.urlopen(probe_request, timeout=1):  # noqa: S310 (loopback)
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"localstripe did not start on port {port}") from None
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def card_add(org, number: str = GOOD_CARD):
    """The organisation's saved PaymentMethod for a card number: a SetupIntent confirmed with the
    card at localstripe, then `payment_method_add`, as the page does with Stripe.js."""
    import stripe

    from invoices import services, stripe_gateway

    setup = services.payment_method_setup_start(org=org)
    stripe_gateway.configure()
    pm = stripe.PaymentMethod.create(
        type="card", card={"number": number, "exp_month": 12, "exp_year": 2030, "cvc": "123"}
    )
    stripe.SetupIntent.confirm(setup.id, payment_method=pm.id)
    return services.payment_method_add(org=org, stripe_payment_method_id=pm.id, setup_intent_id=setup.id)
