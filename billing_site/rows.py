"""Model instances to and from hand-written SQL, for the hot paths of the metering API where building
an ORM query costs several times more than running it (the API-key lookup of every request, a job's
hold and charge).

`Columns(Model, alias)` is a model's concrete columns: `.sql` is the select (or RETURNING) list, and
`.load(row)` turns those values of a row back into an instance exactly as the ORM would, the backend's
converters first (SQLite returns datetimes naive, UUIDs as hex, decimals as floats), then
`Model.from_db`; `load_joined(parts, row)` does that for each model of a row that joins several.
`.insert(instance)` is the other way: one INSERT of all its values (primary key
included), prepared as `save()` prepares them; `.json(instance)` gives the same values as a JSON
object by column, for PostgreSQL's json_populate_record.

`planned_cursor()` is for those hot statements: on PostgreSQL its parameters are bound by the server,
so psycopg prepares a statement that runs more than five times on a connection and PostgreSQL plans
it once per connection, not on every run (the API-key lookup's five-table join spent 0.3 ms planning
and 0.04 ms running). A connection pooler in front of PostgreSQL must then keep prepared statements
per client (PgBouncer 1.21+ with max_prepared_statements, or session pooling).
"""

import json

from django.db import DEFAULT_DB_ALIAS, InterfaceError, OperationalError, connections
from django.db.models import Model


class Columns:
    def __init__(self, model: type[Model], alias: str = ""):
        self.model = model
        self.alias = alias
        self.fields = model._meta.concrete_fields
        self.attnames = [f.attname for f in self.fields]
        prefix = f"{alias}." if alias else ""  # RETURNING takes bare names on SQLite
        self.sql = ", ".join(f'{prefix}"{f.column}"' for f in self.fields)
        names = ", ".join(f'"{f.column}"' for f in self.fields)
        placeholders = ", ".join(["%s"] * len(self.fields))
        self._insert_sql = f'INSERT INTO "{model._meta.db_table}" ({names}) VALUES ({placeholders})'  # noqa: S608 (our columns)
        self._converters: dict[str, list] = {}  # by database vendor

    def __len__(self) -> int:
        return len(self.fields)

    def _converters_for(self, conn) -> list:
        """[(position, column, converters)] of the columns that have converters, as the compiler
        finds them (SQLCompiler.get_converters)."""
        found = self._converters.get(conn.vendor)
        if found is None:
            found = []
            for i, field in enumerate(self.fields):
                col = field.get_col(self.alias or self.model._meta.db_table)
                converters = conn.ops.get_db_converters(col) + col.get_db_converters(conn)
                if converters:
                    found.append((i, col, converters))
            self._converters[conn.vendor] = found
        return found

    def load(self, values) -> Model:
        """The instance for this model's values, in `self.fields` order."""
        conn = connections[DEFAULT_DB_ALIAS]
        values = list(values)
        for i, col, converters in self._converters_for(conn):
            for converter in converters:
                values[i] = converter(values[i], col, conn)
        return self.model.from_db(conn.alias, self.attnames, values)

    def insert(self, instance: Model) -> None:
        """INSERTs the instance, its primary key included, and marks it saved."""
        conn = connections[DEFAULT_DB_ALIAS]
        values = [f.get_db_prep_save(getattr(instance, f.attname), conn) for f in self.fields]
        with conn.cursor() as cursor:
            cursor.execute(self._insert_sql, values)
        instance._state.adding = False
        instance._state.db = conn.alias

    def json(self, instance: Model) -> str:
        """The instance's attribute values as a JSON object by column; datetimes, UUIDs and
        decimals as their text, which PostgreSQL reads back exactly."""
        return json.dumps({f.column: getattr(instance, f.attname) for f in self.fields}, default=str)


def planned_cursor():
    """A cursor for a hot hand-written statement (see the module's words): on PostgreSQL one that
    binds parameters on the server, wrapped as Django wraps its own (execute_wrapper, the query log,
    database errors as django.db exceptions, the health check); elsewhere Django's own cursor."""
    conn = connections[DEFAULT_DB_ALIAS]
    if conn.vendor != "postgresql":
        return conn.cursor()
    from django.db.backends.postgresql.base import ServerBindingCursor

    conn.close_if_health_check_failed()
    conn.ensure_connection()
    conn.validate_thread_sharing()
    with conn.wrap_database_errors:
        raw = ServerBindingCursor(conn.connection)
    return conn.make_debug_cursor(raw) if conn.queries_logged else conn.make_cursor(raw)


def fetch_one_first_in_request(sql: str, params: list):
    """fetchone() of a read through planned_cursor() that is the first query of a request, and
    stands in for Django's connection health check.

    With CONN_HEALTH_CHECKS, Django sends SELECT 1 before the first query of a request on a reused
    connection and reconnects if that fails: one more round trip to PostgreSQL on every request,
    which cost the jobs path of the metering API a tenth of its rate. Here the read itself is the
    check: if the reused connection turns out to be broken, the read is sent once more on a new
    connection, as it would have been after the check. Only for a read: it may run twice."""
    conn = connections[DEFAULT_DB_ALIAS]
    if (
        conn.connection is None
        or not conn.health_check_enabled
        or conn.health_check_done
        or conn.in_atomic_block
    ):
        return _fetch_one(sql, params)
    conn.health_check_done = True
    try:
        return _fetch_one(sql, params)
    except (OperationalError, InterfaceError):
        conn.close()
    return _fetch_one(sql, params)


def _fetch_one(sql: str, params: list):
    with planned_cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def load_joined(parts: tuple[Columns, ...], row) -> list[Model | None]:
    """The instances of a row that selects each of `parts`' columns in turn; None for a part whose
    primary key is NULL (a LEFT JOIN that found nothing). The primary key comes first in each."""
    start, loaded = 0, []
    for part in parts:
        values = row[start : start + len(part)]
        start += len(part)
        loaded.append(part.load(values) if values[0] is not None else None)
    return loaded
