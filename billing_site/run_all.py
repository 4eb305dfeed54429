"""`make run`: starts every part of the site on the embedded defaults and stops them all on Ctrl-C.

Each part is a child process; if one dies, the others are stopped too, so a broken start is never
mistaken for a running site.
"""

import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


LOCALSTRIPE_PORT = "8420"
LOCALSTRIPE_STATE = ROOT / "localstripe-state.pickle"  # the demo's customers and cards, kept between runs


def parts(port: str) -> dict[str, list[str]]:
    celery = [str(BIN / "celery"), "-A", "billing_site"]
    return {
        "stripe": [
            sys.executable,
            "-m",
            "billing_site.localstripe_server",
            "--port",
            LOCALSTRIPE_PORT,
            "--state",
            str(LOCALSTRIPE_STATE),
        ],
        "web": [str(BIN / "gunicorn"), "billing_site.wsgi", "-b", f"127.0.0.1:{port}", "-w", "2"],
        "worker": [*celery, "worker", "--pool", "solo", "--loglevel", "WARNING"],
        "beat": [*celery, "beat", "--loglevel", "WARNING"],
    }


def register_webhook(stripe_base: str, port: str, secret: str) -> None:
    """Tells localstripe to send signed events to our endpoint (it forgets on a restart)."""
    data = urllib.parse.urlencode(
        {"url": f"http://127.0.0.1:{port}/stripe/webhook/", "secret": secret}
    ).encode()
    for _ in range(50):
        try:
            urllib.request.urlopen(f"{stripe_base}/_config/webhooks/billing", data=data, timeout=2)  # noqa: S310
            return
        except OSError:
            time.sleep(0.2)
    print("localstripe did not answer: card payments will say they are unavailable.", file=sys.stderr)


def main() -> int:
    port = os.environ.get("PORT", "8000")
    env = dict(os.environ)
    # The local fake Stripe, unless real Stripe (or another fake) is configured.
    if not env.get("STRIPE_API_BASE") and not env.get("STRIPE_SECRET_KEY", "").startswith("sk_live"):
        env["STRIPE_API_BASE"] = f"http://127.0.0.1:{LOCALSTRIPE_PORT}"
    procs: dict[str, subprocess.Popen] = {}
    for name, cmd in parts(port).items():
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)  # noqa: S603 (our own commands)
    if env.get("STRIPE_API_BASE", "").startswith("http://127.0.0.1"):
        register_webhook(env["STRIPE_API_BASE"], port, env.get("STRIPE_WEBHOOK_SECRET", "whsec_localstripe"))
    print(
        f"\n  Billing dashboard: http://127.0.0.1:{port}/settings/billing/   (staff: http://127.0.0.1:{port}/admin/)"
    )
    print("  Sign in with the logins printed above. Ctrl-C stops everything.\n", flush=True)

    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    exit_code = 0
    while not stopping:
        for name, proc in procs.items():
            if proc.poll() is not None:
                print(f"{name} stopped (exit {proc.returncode}); stopping the rest.", file=sys.stderr)
                exit_code, stopping = 1, True
        time.sleep(0.5)
    for proc in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
