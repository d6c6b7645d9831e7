-- record_outbox_results as before, reading the batch's outbox rows by key: with the
-- batch's size unknown to the planner (a JSON argument), its plan read the whole outbox
-- on every call, a read that grows with the table and took most of a callback's
-- database time in a backlog.
alter function taskman.record_outbox_results(jsonb, integer, double precision,
                                             double precision)
  set enable_seqscan = off;
