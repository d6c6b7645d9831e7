-- The claim's and the record's lookups by key stay index scans whatever the statistics
-- say. Their plans are cached for the session (the claim's is generic by design), so
-- they are made from the statistics of the moment. Taken while the tables were empty or
-- tiny (a new project, right after an ANALYZE), those made a sequential scan the
-- cheapest way to find a claimed task's row and its private row, and the plan kept
-- doing that once per task while the tables grew, until the next autoanalyze: with
-- 20,000 tasks arriving at once, each claim of 100 read both tables 100 times (measured
-- with the worker's statements: 420 µs per claimed task instead of 40). Every table
-- these functions read has the index they need; with sequential scans off, the planner
-- uses it whatever the row counts say.
-- The worker's two statements, claim_admitted_tasks and record_polls, pass it on to the
-- functions they call.
alter function taskman.claim_due_tasks(text, integer, integer) set enable_seqscan = off;
alter function taskman.record_poll_results(jsonb) set enable_seqscan = off;
alter function taskman.claim_admitted_tasks(text, integer, integer, double precision,
                                            double precision, double precision)
  set enable_seqscan = off;
alter function taskman.record_polls(text, jsonb, jsonb, integer, double precision,
                                    double precision, double precision) set enable_seqscan = off;
