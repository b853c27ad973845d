-- kind: query
-- How many rows of the selection have a value and a val_loss, per metric, and
-- how many models appear more than once (several layers or splits selected).
-- Placeholders: {{source}}, the selected long-form rows.
WITH sel AS (
    SELECT model, metric, value, val_loss FROM {{source}}
)
SELECT metric,
       CAST(COUNT(*) AS BIGINT) AS n_rows,
       CAST(COUNT(DISTINCT model) AS BIGINT) AS n_distinct,
       CAST(SUM(CASE WHEN val_loss IS NULL OR isnan(val_loss) THEN 1 ELSE 0 END) AS BIGINT) AS n_no_loss,
       CAST(SUM(CASE WHEN value IS NULL OR isnan(value) THEN 1 ELSE 0 END) AS BIGINT) AS n_no_value
FROM sel
GROUP BY metric
ORDER BY metric
