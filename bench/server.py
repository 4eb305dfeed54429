"""The benchmark's own world: a fresh PostgreSQL database, a flushed Redis db, the migrated schema,
one organisation without limits (its owner can sign in with a password), and gunicorn (2 sync
workers) on a free loopback port.

`bench_server()` is a context manager that undoes all of it on the way out, errors included. The
database and Redis db have fixed names, so one run at a time: a second run on the machine waits.
"""

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import redis

ROOT = Path(__file__).resolve().parent.parent
PG_SERVER = "postgres://postgres@127.0.0.1:5432"
DB_NAME = "billing_bench"
DATABASE_URL = f"{PG_SERVER}/{DB_NAME}"
REDIS_URL = "redis://127.0.0.1:6379/14"
GUNICORN_WORKERS = 2
STARTUP_SECONDS = 30
LOCK_FILE = Path(tempfile.gettempdir()) / f"{DB_NAME}.lock"
OWNER_EMAIL = "bench@example.com"
OWNER_PASSWORD = secrets.token_urlsafe(16)  # a fresh one each run; the database is dropped anyway


@dataclass(frozen=True)
class Server:
    port: int
    api_key: str
    org_id: int
    database_url: str
    pid: int  # gunicorn's master; its workers are its children
    owner_email: str = OWNER_EMAIL
    owner_password: str = OWNER_PASSWORD

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def app_env() -> dict[str, str]:
    """The environment of manage.py and gunicorn: our database and Redis, DEBUG off."""
    env = dict(os.environ, DATABASE_URL=DATABASE_URL, REDIS_URL=REDIS_URL)
    env.pop("DJANGO_DEBUG", None)
    return env


def _admin(sql: str) -> None:
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
        conn.execute(sql)


def _drop_database() -> None:
    _admin(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")


def manage(*args: str) -> str:
    """Runs manage.py on the benchmark's database; its output, or an error with the last lines."""
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=app_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        output = "\n".join((done.stdout + done.stderr).splitlines()[-25:])
        raise RuntimeError(f"manage.py {args[0]} failed (exit {done.returncode}):\n{output}")
    return done.stdout


def _prepare_database() -> tuple[int, str]:
    """Fresh database and Redis db, migrated, with the benchmark organisation: (org id, API key)."""
    _drop_database()
    _admin(f"CREATE DATABASE {DB_NAME}")
    redis.Redis.from_url(REDIS_URL).flushdb()
    manage("migrate", "--noinput", "-v0")
    out = manage(
        "create_org",
        "--name=Bench",
        "--plan=pro",
        f"--owner-email={OWNER_EMAIL}",
        f"--password={OWNER_PASSWORD}",
        "--monthly-credits=1000000000",
        "--rpm=100000000",
        "--concurrent-jobs=100000",
    )
    created = json.loads(out.strip().splitlines()[-1])
    return created["org"], created["api_key"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode}:\n{_tail(log)}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r,
        ):
            if r.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"gunicorn did not answer /healthz within {STARTUP_SECONDS} s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to gunicorn's own process group (its master and workers), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@contextlib.contextmanager
def _one_run_at_a_time() -> Iterator[None]:
    """Held while a run owns the database and Redis db; the lock goes with the process."""
    with LOCK_FILE.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another benchmark run on this machine to finish ({LOCK_FILE})", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def bench_server() -> Iterator[Server]:
    with _one_run_at_a_time(), _bench_server() as server:
        yield server


@contextlib.contextmanager
def _bench_server() -> Iterator[Server]:
    log = Path(tempfile.mkstemp(prefix="bench-gunicorn-", suffix=".log")[1])
    proc = None
    try:
        org_id, api_key = _prepare_database()
        port = _free_port()
        gunicorn = Path(sys.executable).parent / "gunicorn"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(gunicorn), "billing_site.wsgi", "-w", str(GUNICORN_WORKERS), "-b", f"127.0.0.1:{port}"],
                cwd=ROOT,
                env=app_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: we stop exactly what we started
            )
        _wait_healthy(proc, port, log)
        yield Server(port=port, api_key=api_key, org_id=org_id, database_url=DATABASE_URL, pid=proc.pid)
        errors = [line for line in log.read_text(errors="replace").splitlines() if "Traceback" in line]
        if errors:
            print(f"gunicorn logged {len(errors)} traceback(s):\n{_tail(log, 60)}", file=sys.stderr)
    finally:
        if proc is not None:
            _stop(proc)
        with contextlib.suppress(Exception):
            _drop_database()
        log.unlink(missing_ok=True)


def read_catalog(database_url: str) -> dict[tuple[str, str], int]:
    """{(product, mode): credits per unit}, as the migrations seeded it."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT product, mode, credits_per_unit FROM usage_operation").fetchall()
    return {(p, m): c for p, m, c in rows}


def api_get(server: Server, path: str) -> dict:
    """GET an /api/v1/ path with the benchmark's key; the JSON answer, or an error if not 200."""
    request = urllib.request.Request(server.url(path), headers={"Authorization": f"Bearer {server.api_key}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def usage_by_product(server: Server) -> dict[str, tuple[int, int]]:
    """{product: (credits, units)} from GET /api/v1/usage, over yesterday to tomorrow (UTC), so a
    run across midnight still sees all of it."""
    today = datetime.now(UTC).date()
    start, end = today - timedelta(days=1), today + timedelta(days=1)
    answer = api_get(server, f"/api/v1/usage?group_by=product&start={start}&end={end}")
    rows = {row["key"]: (row["credits"], row["units"]) for row in answer["rows"]}
    if answer["total_credits"] != sum(credits for credits, _ in rows.values()):
        raise RuntimeError(f"usage: total_credits is not the sum of its rows: {answer}")
    return rows
