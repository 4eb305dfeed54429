"""Exit 0 when the PostgreSQL and Redis at the given URLs answer (used by `make test`)."""

import sys


def main(pg_url: str, redis_url: str) -> int:
    import psycopg
    import redis

    try:
        psycopg.connect(pg_url.replace("/billing", "/postgres"), connect_timeout=3).close()
        redis.Redis.from_url(redis_url, socket_connect_timeout=3).ping()
    except Exception as error:  # noqa: BLE001 - any failure means "not available"
        print(f"not available: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
