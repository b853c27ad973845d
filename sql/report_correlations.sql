-- kind: query
-- The correlations of one selection, as correlate wrote them.
-- Placeholders: {{selection_id}} (a hex hash).
SELECT source, metric, n_models, r2, p_value, spearman_rho, r2_ci_low, r2_ci_high, slope, intercept, note
FROM correlations
WHERE selection_id = '{{selection_id}}'
ORDER BY metric
