-- kind: view
-- Imported per-model metrics in the same long shape as model_metrics_long, so
-- the correlate stage and its selection predicates work on either. Imported
-- tables have no split or layer; every row counts as the final layer.
SELECT source,
       model,
       CAST(NULL AS VARCHAR) AS split,
       CAST(NULL AS VARCHAR) AS layer,
       TRUE AS final_layer,
       depth, width, epochs, weight_decay,
       CAST(seed AS BIGINT) AS init_seed,
       checkpoint, val_loss, metric, value
FROM imported_metrics
