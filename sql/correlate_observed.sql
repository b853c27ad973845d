-- kind: query
-- Observed association of each metric with validation loss over a selection
-- of models: R^2 = corr(x, val_loss)^2, the least-squares line of val_loss on
-- x, and the moments the correlate stage needs to explain undefined values.
-- Placeholders: {{source}} a long-form view, {{where}} the selection predicate.
WITH sel AS (
    SELECT model, metric, value, val_loss
    FROM {{source}}
    WHERE ({{where}}) AND value IS NOT NULL AND NOT isnan(value)
      AND val_loss IS NOT NULL AND NOT isnan(val_loss)
)
SELECT metric,
       CAST(COUNT(*) AS BIGINT) AS n_models,
       CAST(COUNT(DISTINCT model) AS BIGINT) AS n_distinct,
       regr_r2(val_loss, value) AS r2,
       regr_slope(val_loss, value) AS slope,
       regr_intercept(val_loss, value) AS intercept,
       var_pop(value) AS var_x,
       var_pop(val_loss) AS var_y
FROM sel
GROUP BY metric
ORDER BY metric
