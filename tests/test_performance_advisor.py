"""Supabase's Performance Advisor (its database linter) on a fresh install with taskman
exposed: its lints as the Supabase CLI ships them, run for real."""

from __future__ import annotations

from pathlib import Path

from tests.supabase_advisors import advisor_findings


def test_the_performance_advisor_finds_nothing(database_url: str, tmp_path: Path) -> None:
    """Every lint of the Performance Advisor, at WARN and ERROR level: no finding (among
    them auth_rls_initplan, multiple_permissive_policies, duplicate_index)."""
    assert advisor_findings(database_url, "performance", tmp_path) == []


def test_a_policy_that_reads_a_setting_for_each_row_is_found(conn, database_url: str,
                                                             tmp_path: Path) -> None:
    """auth_rls_initplan, as the tasks' insert policy once was: current_setting() not
    wrapped in a select is evaluated for each row."""
    conn.execute("create policy per_row on taskman.tasks for select to authenticated"
                 " using (current_setting('taskman.task_creator', true) = 'on')")
    findings = advisor_findings(database_url, "performance", tmp_path)
    assert {f["name"] for f in findings} >= {"auth_rls_initplan"}
    assert any("per_row" in f["detail"] for f in findings)
