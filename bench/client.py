"""A light HTTP/1.1 client and a way to run it in a few processes.

Client and server share the machine's cores, so the client must cost little CPU per request: a
plain socket per connection, request bytes built by hand, the response taken in as few recv() calls
as it needs and parsed just enough (status, Content-Length or chunked, Connection: close); about a
third of http.client's CPU time a request. gunicorn's sync workers close the connection after each
response; the client then reconnects for the next request, and keeps it when a server allows.
The same code drives every path and its ceiling, so the ratios compare like with like.
"""

import multiprocessing
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

RECV_BYTES = 65536


class HttpError(Exception):
    pass


class Connection:
    def __init__(self, port: int, headers: dict[str, str] | None = None):
        self.port = port
        extra = {"Host": f"127.0.0.1:{port}", **(headers or {})}
        self._headers = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
        self._sock: socket.socket | None = None

    def _connect(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.settimeout(30)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.connect(("127.0.0.1", self.port))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """Sends one request, returns (status, body). A kept-alive connection the server closed
        meanwhile (nothing came back) is reopened once; any other failure raises."""
        head = f"{method} {path} HTTP/1.1\r\n{self._headers}"
        if body or method != "GET":
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        data = (head + "\r\n").encode() + body
        reused = self._sock is not None
        if not reused:
            self._connect()
        try:
            self._sock.sendall(data)
            received = self._sock.recv(RECV_BYTES)
            if not received:
                raise ConnectionResetError("closed before answering")
        except ConnectionError:
            if not reused:
                raise
            self.close()
            self._connect()
            self._sock.sendall(data)
            received = self._sock.recv(RECV_BYTES)
        return self._read_response(received)

    def _recv(self) -> bytes:
        more = self._sock.recv(RECV_BYTES)
        if not more:
            raise HttpError("connection closed mid-response")
        return more

    def _read_response(self, buf: bytes) -> tuple[int, bytes]:
        while b"\r\n\r\n" not in buf:
            buf += self._recv()
        head, _, body = buf.partition(b"\r\n\r\n")
        status_line, *header_lines = head.split(b"\r\n")
        version, status = status_line.split(b" ", 2)[:2]
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        close = headers.get(b"connection") == b"close" or version == b"HTTP/1.0"
        if b"content-length" in headers:
            length = int(headers[b"content-length"])
            while len(body) < length:
                body += self._recv()
        elif b"chunked" in headers.get(b"transfer-encoding", b""):
            while (whole := _dechunk(body)) is None:
                body += self._recv()
            body = whole
        else:  # the body ends when the server closes
            while more := self._sock.recv(RECV_BYTES):
                body += more
            close = True
        if close:
            self.close()
        return int(status), body


def _dechunk(data: bytes) -> bytes | None:
    """The body of a chunked message, or None while `data` does not hold all of it yet."""
    chunks, pos = [], 0
    while (end := data.find(b"\r\n", pos)) >= 0:
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(chunks) if data.endswith(b"\r\n\r\n") else None
        pos = end + 2 + size + 2
        if pos > len(data):
            return None
        chunks.append(data[end + 2 : pos - 2])
    return None


@dataclass
class Tally:
    """What one client process saw: latencies of counted requests, and any wrong answers."""

    latencies: list[float] = field(default_factory=list)
    requests: int = 0  # all requests, warm-up included
    failed: int = 0  # answers other than the expected status
    examples: list[str] = field(default_factory=list)  # the first few of them
    extra: dict = field(default_factory=dict)

    def merge(self, other: "Tally") -> None:
        self.latencies += other.latencies
        self.requests += other.requests
        self.failed += other.failed
        self.examples += other.examples[: 5 - len(self.examples)]
        for k, v in other.extra.items():
            self.extra[k] = self.extra.get(k, 0) + v


class Session:
    """A connection that times every request and counts those that end inside [start, stop)."""

    def __init__(self, conn: Connection, start: float, stop: float):
        self.conn, self.start, self.stop = conn, start, stop
        self.tally = Tally()

    def call(self, method: str, path: str, body: bytes = b"", expect: int = 200) -> tuple[int, bytes]:
        t0 = time.monotonic()
        try:
            status, answer = self.conn.request(method, path, body)
        except (OSError, HttpError) as e:
            self.conn.close()
            status, answer = 0, repr(e).encode()
        t1 = time.monotonic()
        self.tally.requests += 1
        if status != expect:
            self.tally.failed += 1
            if len(self.tally.examples) < 5:
                self.tally.examples.append(f"{method} {path}: {status} {answer[:300]!r}")
        elif self.start <= t1 < self.stop:
            self.tally.latencies.append(t1 - t0)
        return status, answer


def in_processes(target: Callable[[int], object], count: int, timeout: float = 300) -> list:
    """Runs target(0) … target(count - 1) in forked processes; returns their results in order.
    An exception in any of them is raised here, with its traceback."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()

    def child(i: int) -> None:
        try:
            queue.put((i, True, target(i)))
        except BaseException:  # noqa: BLE001 - reported to the parent
            queue.put((i, False, traceback.format_exc()))

    procs = [ctx.Process(target=child, args=(i,), daemon=True) for i in range(count)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        for _ in procs:
            i, ok, value = queue.get(timeout=timeout)
            if not ok:
                raise RuntimeError(f"client process {i} failed:\n{value}")
            results[i] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [results[i] for i in range(count)]


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]
