-- kind: view
-- Pairwise metrics per (model, split, layer, metric), combined across the
-- tiles of pair_tiles with Chan's formula for merging partial moments:
--   N  = sum n_i
--   mu = sum(n_i * mean_i) / N
--   M2 = sum M2_i + sum n_i * (mean_i - mu)^2
-- which is exact (no sum-of-squares cancellation). var is the population
-- variance M2 / N, std its square root.
WITH totals AS (
    SELECT model, split, layer, metric,
           SUM(n) AS n,
           SUM(CAST(n AS DOUBLE) * mean) / CAST(NULLIF(SUM(n), 0) AS DOUBLE) AS mean,
           SUM(excluded) AS excluded
    FROM pair_tiles
    GROUP BY model, split, layer, metric
)
SELECT t.model, t.split, t.layer, t.metric,
       CAST(t.n AS BIGINT) AS n,
       t.mean,
       SUM(p.m2 + CAST(p.n AS DOUBLE) * (p.mean - t.mean) * (p.mean - t.mean)) AS m2,
       SUM(p.m2 + CAST(p.n AS DOUBLE) * (p.mean - t.mean) * (p.mean - t.mean)) / CAST(NULLIF(t.n, 0) AS DOUBLE) AS var,
       SQRT(SUM(p.m2 + CAST(p.n AS DOUBLE) * (p.mean - t.mean) * (p.mean - t.mean)) / CAST(NULLIF(t.n, 0) AS DOUBLE)) AS std,
       MIN(p.min) AS min,
       MAX(p.max) AS max,
       CAST(t.excluded AS BIGINT) AS excluded
FROM pair_tiles p
JOIN totals t
  ON p.model = t.model AND p.split = t.split AND p.layer = t.layer AND p.metric = t.metric
GROUP BY t.model, t.split, t.layer, t.metric, t.n, t.mean, t.excluded
