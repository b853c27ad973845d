-- kind: view
-- model_metrics in long form, one row per (model, split, layer, metric), the
-- shape the correlate stage works on. Only the model-level numbers the paper
-- correlates with validation loss are listed.
SELECT model, split, layer, final_layer, depth, width, epochs, weight_decay, init_seed, checkpoint, val_loss, 'nc1_cdnv' AS metric, nc1_cdnv AS value FROM model_metrics
UNION ALL
SELECT model, split, layer, final_layer, depth, width, epochs, weight_decay, init_seed, checkpoint, val_loss, 'nc2_equinorm_cov' AS metric, nc2_equinorm_cov AS value FROM model_metrics
UNION ALL
SELECT model, split, layer, final_layer, depth, width, epochs, weight_decay, init_seed, checkpoint, val_loss, 'nc2_interference_mean' AS metric, nc2_interference_mean AS value FROM model_metrics
UNION ALL
SELECT model, split, layer, final_layer, depth, width, epochs, weight_decay, init_seed, checkpoint, val_loss, 'nc2_equiangular_cov' AS metric, nc2_equiangular_cov AS value FROM model_metrics
UNION ALL
SELECT model, split, layer, final_layer, depth, width, epochs, weight_decay, init_seed, checkpoint, val_loss, 'nc2_etf_error' AS metric, nc2_etf_error AS value FROM model_metrics
UNION ALL
SELECT model, split, layer, final_layer, depth, width, epochs, weight_decay, init_seed, checkpoint, val_loss, 'gnc2_logkernel_mean' AS metric, gnc2_logkernel_mean AS value FROM model_metrics
UNION ALL
SELECT model, split, layer, final_layer, depth, width, epochs, weight_decay, init_seed, checkpoint, val_loss, 'gnc2_uniformity_cov' AS metric, gnc2_uniformity_cov AS value FROM model_metrics
UNION ALL
SELECT model, split, layer, final_layer, depth, width, epochs, weight_decay, init_seed, checkpoint, val_loss, 'gnc2_uncentred_uniformity_cov' AS metric, gnc2_uncentred_uniformity_cov AS value FROM model_metrics
UNION ALL
SELECT model, split, layer, final_layer, depth, width, epochs, weight_decay, init_seed, checkpoint, val_loss, 'gnc2_uncentred_logkernel_mean' AS metric, gnc2_uncentred_logkernel_mean AS value FROM model_metrics
UNION ALL
SELECT model, split, layer, final_layer, depth, width, epochs, weight_decay, init_seed, checkpoint, val_loss, 'nc3_duality_mean' AS metric, nc3_duality_mean AS value FROM model_metrics
UNION ALL
SELECT model, split, layer, final_layer, depth, width, epochs, weight_decay, init_seed, checkpoint, val_loss, 'unc3_duality_cov' AS metric, unc3_duality_cov AS value FROM model_metrics
UNION ALL
SELECT model, split, layer, final_layer, depth, width, epochs, weight_decay, init_seed, checkpoint, val_loss, 'nc4_agreement' AS metric, nc4_agreement AS value FROM model_metrics
UNION ALL
SELECT model, split, layer, final_layer, depth, width, epochs, weight_decay, init_seed, checkpoint, val_loss, 'nc4_agreement_analysed' AS metric, nc4_agreement_analysed AS value FROM model_metrics
