"""Throwaway PostgreSQL databases on the local server, for tests and benches.

The server is `EHI_TEST_PG_URL` (an admin connection, default postgres on 127.0.0.1:5432);
each database is made fresh and dropped by name, with its connections, when done.
"""

from __future__ import annotations

import os
import uuid

PG_ADMIN_URL = os.environ.get("EHI_TEST_PG_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def create_database(prefix: str, connect_timeout: int = 3) -> str:
    """A new empty database named `prefix` + a random suffix; its SQLAlchemy URL. Raises
    psycopg's errors when the server is not there."""
    import psycopg

    name = f"{prefix}{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL.replace("+psycopg", ""), autocommit=True,
                         connect_timeout=connect_timeout) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"


def drop_database(url: str) -> None:
    """Drop the database of `url` (from `create_database`), closing its connections."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL.replace("+psycopg", ""), autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
