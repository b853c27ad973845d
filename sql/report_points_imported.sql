-- kind: query
-- The models of an imported table in the shape of report_points: one row per
-- model, its recipe (parsed from the id at import), validation loss and the
-- report's eight properties, each taken from the imported metric of the same
-- name (import with columns=nc1_cdnv=..., nc2_equinorm_cov=..., ...); a
-- property the table lacks is NULL. Imported tables have no layer; their
-- parameter count is the metric n_params where one was imported.
-- Placeholders: {{selection}}, a view of imported_metrics_long rows.
SELECT 'imported:' || source AS source, model, layer, depth, width, epochs, weight_decay, init_seed,
       MAX(CASE WHEN metric = 'n_params' THEN value END) AS n_params,
       MAX(val_loss) AS val_loss,
       MAX(CASE WHEN metric = 'nc1_cdnv' THEN value END) AS nc1_cdnv,
       MAX(CASE WHEN metric = 'nc2_equinorm_cov' THEN value END) AS nc2_equinorm_cov,
       MAX(CASE WHEN metric = 'nc2_equiangular_cov' THEN value END) AS nc2_equiangular_cov,
       MAX(CASE WHEN metric = 'nc2_etf_error' THEN value END) AS nc2_etf_error,
       MAX(CASE WHEN metric = 'gnc2_uniformity_cov' THEN value END) AS gnc2_uniformity_cov,
       MAX(CASE WHEN metric = 'nc3_duality_mean' THEN value END) AS nc3_duality_mean,
       MAX(CASE WHEN metric = 'unc3_duality_cov' THEN value END) AS unc3_duality_cov,
       MAX(CASE WHEN metric = 'nc4_agreement' THEN value END) AS nc4_agreement
FROM {{selection}}
GROUP BY source, model, layer, depth, width, epochs, weight_decay, init_seed
ORDER BY model
