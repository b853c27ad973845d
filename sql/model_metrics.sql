-- kind: view
-- One row per (model, split, layer) with every model-level neural-collapse
-- number (DESIGN.md "Metric definitions"), the model's recipe and its
-- validation metrics. Columns are documented in schemas/model_metrics.json.
--
-- Sources: tile_totals (pairwise metrics over c < c' in V', Chan-combined over
-- tiles), class_metrics (per-class norms and self-duality, analysed classes
-- only), decisions on the validation split (NC4), models (val_loss, recipe).
--
-- Simplex-ETF error of the centred-mean Gram matrix G (C = |V'|):
--   ||G||_F^2 = sum_c ||m_c||^4 + 2 sum_{c<c'} G_cc'^2
--   <G, B>    = (C tr G - 1'G1) / (C sqrt(C-1)),   1'G1 = tr G + 2 sum_{c<c'} G_cc'
--   error     = sqrt(2 - 2 <G, B> / ||G||_F)
-- sum_{c<c'} G_cc'^2 comes from the 'gram' tiles as m2 + n * mean^2.
WITH cdnv AS (
    SELECT model, split, layer, n, mean, std, excluded FROM tile_totals WHERE metric = 'cdnv'
), intf AS (
    SELECT model, split, layer, mean, std FROM tile_totals WHERE metric = 'interference'
), logk AS (
    SELECT model, split, layer, mean, std FROM tile_totals WHERE metric = 'logkernel'
), logku AS (
    SELECT model, split, layer, mean, std FROM tile_totals WHERE metric = 'logkernel_uncentred'
), riesz AS (
    SELECT model, split, layer, mean, std FROM tile_totals WHERE metric = 'riesz'
), rieszu AS (
    SELECT model, split, layer, mean, std FROM tile_totals WHERE metric = 'riesz_uncentred'
), gram AS (
    SELECT model, split, layer,
           CAST(n AS DOUBLE) * mean AS off_sum,
           m2 + CAST(n AS DOUBLE) * mean * mean AS off_sumsq
    FROM tile_totals WHERE metric = 'gram'
), cls AS (
    SELECT model, split, layer,
           COUNT(*) AS n_classes,
           AVG(log_norm) AS ln_mean,
           STDDEV_SAMP(log_norm) AS ln_std,
           AVG(nc3_cos) AS cos_mean,
           STDDEV_SAMP(nc3_cos) AS cos_std,
           SUM(norm * norm) AS trace_g,
           SUM(norm * norm * norm * norm) AS diag_sumsq
    FROM class_metrics
    WHERE analysed
    GROUP BY model, split, layer
), dec AS (
    -- NC4 over every validation sample, and over those whose true label is
    -- in V' (the authors' denominator).
    SELECT model, layer,
           CAST(SUM(agree) AS DOUBLE) / CAST(NULLIF(SUM(samples), 0) AS DOUBLE) AS agreement,
           CAST(SUM(samples) AS BIGINT) AS samples,
           CAST(SUM(CASE WHEN analysed THEN agree ELSE 0 END) AS DOUBLE)
               / CAST(NULLIF(SUM(CASE WHEN analysed THEN samples ELSE 0 END), 0) AS DOUBLE) AS agreement_analysed,
           CAST(SUM(CASE WHEN analysed THEN samples ELSE 0 END) AS BIGINT) AS samples_analysed
    FROM decisions
    WHERE split = 'validation'
    GROUP BY model, layer
), etf AS (
    SELECT c.model, c.split, c.layer,
           SQRT(GREATEST(0.0, 2.0 - 2.0 *
               ((CAST(c.n_classes AS DOUBLE) * c.trace_g - (c.trace_g + 2.0 * g.off_sum))
                / (CAST(c.n_classes AS DOUBLE) * SQRT(CAST(c.n_classes AS DOUBLE) - 1.0)))
               / NULLIF(SQRT(c.diag_sumsq + 2.0 * g.off_sumsq), 0.0))) AS etf_error
    FROM cls c
    JOIN gram g ON c.model = g.model AND c.split = g.split AND c.layer = g.layer
    WHERE c.n_classes > 1
)
SELECT c.model, c.split, c.layer,
       CAST(c.n_classes AS BIGINT) AS n_classes,
       CAST(d.n AS BIGINT) AS n_pairs,
       d.mean AS nc1_cdnv,
       d.std AS nc1_cdnv_std,
       CAST(d.excluded AS BIGINT) AS nc1_excluded_pairs,
       c.ln_mean AS nc2_equinorm_mean,
       c.ln_std AS nc2_equinorm_std,
       c.ln_std / NULLIF(c.ln_mean, 0.0) AS nc2_equinorm_cov,
       i.mean AS nc2_interference_mean,
       i.std AS nc2_interference_std,
       i.std / NULLIF(i.mean, 0.0) AS nc2_equiangular_cov,
       e.etf_error AS nc2_etf_error,
       k.mean AS gnc2_logkernel_mean,
       k.std AS gnc2_logkernel_std,
       k.std / NULLIF(k.mean, 0.0) AS gnc2_uniformity_cov,
       ku.mean AS gnc2_uncentred_logkernel_mean,
       ku.std AS gnc2_uncentred_logkernel_std,
       ku.std / NULLIF(ku.mean, 0.0) AS gnc2_uncentred_uniformity_cov,
       rz.mean AS gnc2_riesz_mean,
       rz.std / NULLIF(rz.mean, 0.0) AS gnc2_riesz_uniformity_cov,
       rzu.mean AS gnc2_uncentred_riesz_mean,
       rzu.std / NULLIF(rzu.mean, 0.0) AS gnc2_uncentred_riesz_uniformity_cov,
       c.cos_mean AS nc3_duality_mean,
       c.cos_std AS nc3_duality_std,
       c.cos_std / NULLIF(c.cos_mean, 0.0) AS unc3_duality_cov,
       dec.agreement AS nc4_agreement,
       dec.samples AS nc4_samples,
       dec.agreement_analysed AS nc4_agreement_analysed,
       dec.samples_analysed AS nc4_samples_analysed,
       m.val_loss,
       m.val_acc,
       m.depth,
       m.width,
       m.n_params,
       m.epochs,
       m.weight_decay,
       m.init_seed,
       m.checkpoint,
       c.layer = CAST(m.depth AS VARCHAR) AS final_layer
FROM cls c
LEFT JOIN cdnv d ON c.model = d.model AND c.split = d.split AND c.layer = d.layer
LEFT JOIN intf i ON c.model = i.model AND c.split = i.split AND c.layer = i.layer
LEFT JOIN logk k ON c.model = k.model AND c.split = k.split AND c.layer = k.layer
LEFT JOIN logku ku ON c.model = ku.model AND c.split = ku.split AND c.layer = ku.layer
LEFT JOIN riesz rz ON c.model = rz.model AND c.split = rz.split AND c.layer = rz.layer
LEFT JOIN rieszu rzu ON c.model = rzu.model AND c.split = rzu.split AND c.layer = rzu.layer
LEFT JOIN etf e ON c.model = e.model AND c.split = e.split AND c.layer = e.layer
LEFT JOIN dec ON c.model = dec.model AND c.layer = dec.layer
LEFT JOIN models m ON c.model = m.model
