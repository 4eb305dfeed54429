"""localstripe, the fake Stripe of development and tests, with its state kept where we say.

localstripe itself keeps its whole state in /tmp/localstripe.pickle, rewritten after every change
and read back at start. So every instance on the machine shares that one file: a test run's server
overwrites the cards of `make run`'s, and a server stopped in the middle of a write leaves a
truncated file that the next one cannot start from (`make run` after `make test` then failed with
"pickle data was truncated"). This runs the same server with:

- `--state FILE`: the state kept in FILE, written whole to a temporary file and renamed over it, so
  a stopped server leaves the old state or the new one, never half. A FILE that cannot be read is
  moved aside to FILE.unreadable and the server starts empty, saying so.
- no `--state`: the state in memory only (the tests and the soak start a fresh server each time,
  and need no copy of the whole store written after every request).

    python -m billing_site.localstripe_server [--port 8420] [--state FILE]
"""

import argparse
import os
import pickle
import sys
import tempfile
from pathlib import Path

from localstripe import server
from localstripe.resources import store


def _load(state: Path) -> None:
    try:
        with state.open("rb") as f:
            saved = pickle.load(f)  # noqa: S301 (our own server's file)
    except FileNotFoundError:
        return
    except Exception as e:  # noqa: BLE001 - any unreadable file: start empty, and say so
        aside = state.with_name(state.name + ".unreadable")
        state.replace(aside)
        print(
            f"localstripe: {state} could not be read ({e}); moved to {aside}, starting empty", file=sys.stderr
        )
        return
    store.clear()
    store.update(saved)


def _dump(state: Path) -> None:
    fd, temporary = tempfile.mkstemp(dir=state.parent, prefix=f".{state.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(dict(store), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(temporary, state)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m billing_site.localstripe_server", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--port", type=int, default=8420)
    parser.add_argument("--state", type=Path, help="the file that keeps the state (default: memory only)")
    args = parser.parse_args(argv)
    if args.state is None:
        store.dump_to_disk = lambda: None
    else:
        state = args.state.resolve()
        _load(state)
        store.dump_to_disk = lambda: _dump(state)
    sys.argv = [sys.argv[0], "--port", str(args.port), "--from-scratch"]  # what we loaded stays
    server.start()


if __name__ == "__main__":
    main()
