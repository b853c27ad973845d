-- kind: query
-- The selected models (source: model_metrics) with their recipe, validation loss and the eight
-- properties the report plots against validation loss and model size.
-- Placeholders: {{selection}}, a view of model_metrics rows.
SELECT 'model_metrics' AS source, model, layer, depth, width, epochs, weight_decay, init_seed, n_params, val_loss,
       nc1_cdnv, nc2_equinorm_cov, nc2_equiangular_cov, nc2_etf_error,
       gnc2_uniformity_cov, nc3_duality_mean, unc3_duality_cov, nc4_agreement
FROM {{selection}}
ORDER BY model, layer
