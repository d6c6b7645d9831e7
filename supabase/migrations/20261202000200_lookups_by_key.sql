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
-- record_polls passes it on to record_host_outcomes and record_poll_results, which it
-- calls; claim_admitted_tasks sets it where it is defined (20261202000300).
alter function taskman.claim_due_tasks(text, integer, integer) set enable_seqscan = off;
alter function taskman.record_poll_results(jsonb) set enable_seqscan = off;
alter function taskman.record_polls(text, jsonb, jsonb, integer, double precision,
                                    double precision, double precision) set enable_seqscan = off;
