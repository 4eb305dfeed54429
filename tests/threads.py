"""Real threads for the PostgreSQL concurrency tests."""

import threading

from django.db import connection


def in_threads(n, work, timeout=120):
    """Runs work(i) in n threads released at once; returns their results or exceptions. Each
    thread has its own database connection and closes it when done."""
    barrier = threading.Barrier(n)
    results = [None] * n

    def run(i):
        try:
            barrier.wait()
            results[i] = work(i)
        except Exception as error:  # noqa: BLE001 - the test inspects what each thread got
            results[i] = error
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results
