-- kind: query
-- Every analysed layer of the selected models (the selection usually holds
-- the final layer only), for the metric-through-depth figure.
-- Placeholders: {{selection}}.
SELECT m.model, CAST(m.layer AS BIGINT) AS layer,
       m.nc1_cdnv, m.nc2_equinorm_cov, m.nc2_equiangular_cov, m.nc2_etf_error,
       m.gnc2_uniformity_cov, m.nc3_duality_mean, m.unc3_duality_cov, m.nc4_agreement
FROM model_metrics m
WHERE m.model IN (SELECT model FROM {{selection}})
  AND m.split IN (SELECT split FROM {{selection}})
ORDER BY m.model, CAST(m.layer AS BIGINT)
