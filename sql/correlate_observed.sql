-- kind: query
-- How each metric relates to validation loss over a selection of models:
-- R^2 = corr(x, val_loss)^2 with the least-squares line of val_loss on x;
-- the seeded permutation test of R^2 (perm_pvalue: p = (1 + #{R^2_perm >=
-- R^2_obs}) / (1 + n)); Spearman's rho; and a seeded percentile bootstrap
-- interval for R^2 (r2_bootstrap at 2.5 % and 97.5 %, the same resamples).
-- The moments let the correlate stage explain undefined values.
-- Placeholders: {{source}} the selected long-form rows, {{n_permutations}},
-- {{n_bootstrap}}, {{seed}} (numbers filled in by the stage).
WITH sel AS (
    SELECT model, metric, value, val_loss
    FROM {{source}}
    WHERE value IS NOT NULL AND NOT isnan(value)
      AND val_loss IS NOT NULL AND NOT isnan(val_loss)
)
SELECT metric,
       CAST(COUNT(*) AS BIGINT) AS n_models,
       CAST(COUNT(DISTINCT model) AS BIGINT) AS n_distinct,
       regr_r2(val_loss, value) AS r2,
       regr_slope(val_loss, value) AS slope,
       regr_intercept(val_loss, value) AS intercept,
       var_pop(value) AS var_x,
       var_pop(val_loss) AS var_y,
       perm_pvalue(value, val_loss, CAST({{n_permutations}} AS BIGINT), CAST({{seed}} AS BIGINT)) AS p_value,
       spearman(value, val_loss) AS spearman_rho,
       r2_bootstrap(value, val_loss, CAST({{n_bootstrap}} AS BIGINT), CAST({{seed}} AS BIGINT), 0.025) AS r2_ci_low,
       r2_bootstrap(value, val_loss, CAST({{n_bootstrap}} AS BIGINT), CAST({{seed}} AS BIGINT), 0.975) AS r2_ci_high
FROM sel
GROUP BY metric
ORDER BY metric
