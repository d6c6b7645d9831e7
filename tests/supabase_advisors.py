"""Supabase's own database linter (the Security and Performance Advisors' lints), as the
Supabase CLI runs it: ``supabase db advisors`` against a test database, with the schemas
supabase/config.toml exposes set as PostgREST's ``pgrst.db_schemas``, as on a hosted
project whose API serves ``taskman``.

The CLI comes from npm (the ``supabase`` package ships the binary), pinned, installed once
into a cache directory shared by test runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import psycopg

from tests.missing_tools import missing

CLI_VERSION = "2.117.0"
_REPO = Path(__file__).resolve().parent.parent
_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "taskman-tests"


def exposed_schemas() -> list[str]:
    """The schemas the project's API serves (supabase/config.toml ``[api] schemas``)."""
    with (_REPO / "supabase" / "config.toml").open("rb") as config:
        return list(tomllib.load(config)["api"]["schemas"])


def supabase_cli() -> Path:
    """The pinned Supabase CLI, installed from npm on first use."""
    home = _CACHE / f"supabase-cli-{CLI_VERSION}"
    binary = home / "node_modules" / ".bin" / "supabase"
    if binary.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        missing("npm is not installed (it installs the Supabase CLI, whose lints these run)")
    _CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="supabase-cli-", dir=_CACHE))
    subprocess.run([npm, "install", "--prefix", str(staging), "--no-audit", "--no-fund",
                    "--save-exact", f"supabase@{CLI_VERSION}"],
                   check=True, capture_output=True, timeout=600)
    try:
        staging.rename(home)  # atomic: a concurrent run may have won, which is as good
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return binary


def advisor_findings(database_url: str, kind: Literal["security", "performance"],
                     work_dir: Path) -> list[dict[str, Any]]:
    """What the `kind` advisor reports at WARN level or above on `database_url`."""
    cli = supabase_cli()
    database = urlsplit(database_url).path.lstrip("/")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"alter database {database} set pgrst.db_schemas = '"
                     + ", ".join(exposed_schemas()) + "'")
    env = {**os.environ, "HOME": str(work_dir), "SUPABASE_TELEMETRY_DISABLED": "1",
           "DO_NOT_TRACK": "1"}
    run = subprocess.run(
        [str(cli), "db", "advisors", "--db-url", f"{database_url}?sslmode=disable",
         "--type", kind, "--level", "warn", "--output-format", "json"],
        cwd=work_dir, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    answer = json.loads(run.stdout)
    assert "results" in answer, run.stdout
    return [{"name": r["name"], "level": r["level"], "detail": r["detail"]}
            for r in answer["results"]]
