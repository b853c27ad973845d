-- kind: query
-- Permutation test of R^2(x, val_loss) per metric: in permutation p the
-- selected models' val_loss values are re-assigned in the order of the seeded
-- key perm_key(seed, p, model), R^2 is recomputed, and we count how often it
-- reaches the observed R^2 (relative tolerance 1e-12 for rounding in ties).
-- p-value = (1 + n_ge) / (1 + n_perm), computed by the correlate stage.
-- Placeholders: {{source}}, {{where}}, {{n_permutations}}, {{seed}}.
WITH sel AS (
    SELECT model, metric, value, val_loss
    FROM {{source}}
    WHERE ({{where}}) AND value IS NOT NULL AND NOT isnan(value)
      AND val_loss IS NOT NULL AND NOT isnan(val_loss)
), perms AS (
    SELECT value AS perm FROM generate_series(1, {{n_permutations}})
), xs AS (
    SELECT s.metric, p.perm, s.value,
           ROW_NUMBER() OVER (PARTITION BY s.metric, p.perm ORDER BY s.model) AS r
    FROM sel s CROSS JOIN perms p
), ys AS (
    SELECT s.metric, p.perm, s.val_loss,
           ROW_NUMBER() OVER (PARTITION BY s.metric, p.perm
                              ORDER BY perm_key(CAST({{seed}} AS BIGINT), p.perm, s.model), s.model) AS r
    FROM sel s CROSS JOIN perms p
), perm_r2 AS (
    SELECT xs.metric, xs.perm, regr_r2(ys.val_loss, xs.value) AS r2
    FROM xs JOIN ys ON xs.metric = ys.metric AND xs.perm = ys.perm AND xs.r = ys.r
    GROUP BY xs.metric, xs.perm
), observed AS (
    SELECT metric, regr_r2(val_loss, value) AS r2 FROM sel GROUP BY metric
)
SELECT o.metric,
       CAST(SUM(CASE WHEN p.r2 >= o.r2 - 1e-12 * ABS(o.r2) THEN 1 ELSE 0 END) AS BIGINT) AS n_ge,
       CAST(COUNT(*) AS BIGINT) AS n_perm
FROM observed o JOIN perm_r2 p ON o.metric = p.metric
WHERE o.r2 IS NOT NULL
GROUP BY o.metric
ORDER BY o.metric
