"""Connecting through a pooler in tests: PgBouncer stands in for Supabase's poolers.

An arrangement is what a user would configure: DATABASE_URL through the session pooler,
through the transaction pooler (changes are polled), or through the transaction pooler
with a separate listen URL (a direct connection) for NOTIFY.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.devtools.pgbouncer import PgBouncer

SESSION = "session pooler"
TRANSACTION = "transaction pooler"
TRANSACTION_LISTEN = "transaction pooler + listen URL"
ARRANGEMENTS = (SESSION, TRANSACTION, TRANSACTION_LISTEN)
# Test poolers are on a random port, not 6543: their mode is set, not detected.
CHANGE_CHECK_INTERVAL = "0.2"


@dataclass(frozen=True)
class Arrangement:
    """How the worker, the edge and the CLI reach one test database."""

    name: str
    database_url: str  # DATABASE_URL
    settings: dict[str, str]  # the other connection settings, by environment name
    direct_url: str  # the database itself, to look behind the pooler

    @property
    def polls(self) -> bool:
        """Whether changes are polled (no LISTEN anywhere)."""
        return self.name == TRANSACTION

    @property
    def env(self) -> dict[str, str]:
        return {"DATABASE_URL": self.database_url, **self.settings}


def arrangement(name: str, poolers: dict[str, PgBouncer], direct_url: str) -> Arrangement:
    if name == SESSION:
        # Detected: any port but 6543 keeps a session.
        return Arrangement(name, poolers["session"].through(direct_url), {}, direct_url)
    settings = {"TASKMAN_DATABASE_POOL_MODE": "transaction",
                "TASKMAN_CHANGE_CHECK_INTERVAL": CHANGE_CHECK_INTERVAL}
    if name == TRANSACTION_LISTEN:
        settings["TASKMAN_LISTEN_DATABASE_URL"] = direct_url
    return Arrangement(name, poolers["transaction"].through(direct_url), settings, direct_url)
