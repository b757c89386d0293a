-- Materialized views. `refresh_rep_performance_view()` refreshes them CONCURRENTLY (readers
-- are never blocked), which needs the unique index below.

-- The spec's per-rep performance summary (the rep dashboard reads it).
CREATE MATERIALIZED VIEW IF NOT EXISTS mv_rep_performance AS
SELECT r.id AS rep_id,
       r.name AS rep_name,
       r.email AS rep_email,
       (SELECT count(*) FROM calls c WHERE c.rep_id = r.id) AS total_calls,
       count(s.id) AS total_sessions,
       round(avg(s.score), 2) AS avg_score,
       round(avg(s.score) FILTER (WHERE s.dimension = 'product_knowledge'), 2) AS avg_product_knowledge,
       round(avg(s.score) FILTER (WHERE s.dimension = 'discovery'), 2) AS avg_discovery,
       round(avg(s.score) FILTER (WHERE s.dimension = 'objection_handling'), 2) AS avg_objection_handling,
       round(avg(s.score) FILTER (WHERE s.dimension = 'engagement'), 2) AS avg_engagement,
       max(s.created_at) AS last_coached
FROM reps r
LEFT JOIN coaching_sessions s ON s.rep_id = r.id
GROUP BY r.id, r.name, r.email;

-- refresh_rep_performance_view (CONCURRENTLY needs a unique index) and reads by rep.
CREATE UNIQUE INDEX IF NOT EXISTS mv_rep_performance_rep_idx ON mv_rep_performance (rep_id);

