-- kind: query
-- Per selected model: the analysed classes (with their token text) at both
-- ends of three per-class properties, {{top}} of each, and the most and
-- least interfering class pairs from pair_extremes.
-- Placeholders: {{selection}}, {{top}}.
WITH c AS (
    SELECT m.model, m.layer, m.class_id, m.token, m.norm, m.nc3_cos, m.var
    FROM class_metrics m
    JOIN {{selection}} s ON m.model = s.model AND m.split = s.split AND m.layer = s.layer
    WHERE m.analysed
), ranked AS (
    SELECT model, layer, class_id, token, norm, nc3_cos, var,
           ROW_NUMBER() OVER (PARTITION BY model, layer ORDER BY norm ASC, class_id) AS norm_lo,
           ROW_NUMBER() OVER (PARTITION BY model, layer ORDER BY norm DESC, class_id) AS norm_hi,
           ROW_NUMBER() OVER (PARTITION BY model, layer ORDER BY nc3_cos DESC NULLS LAST, class_id) AS dual_hi,
           ROW_NUMBER() OVER (PARTITION BY model, layer ORDER BY nc3_cos ASC NULLS LAST, class_id) AS dual_lo,
           ROW_NUMBER() OVER (PARTITION BY model, layer ORDER BY var DESC, class_id) AS var_hi,
           ROW_NUMBER() OVER (PARTITION BY model, layer ORDER BY var ASC, class_id) AS var_lo
    FROM c
), lists AS (
    SELECT model, layer, 'smallest centred-mean norm' AS list, norm_lo AS rank, token, CAST(NULL AS VARCHAR) AS token_b, norm AS value FROM ranked WHERE norm_lo <= {{top}}
    UNION ALL
    SELECT model, layer, 'largest centred-mean norm', norm_hi, token, CAST(NULL AS VARCHAR), norm FROM ranked WHERE norm_hi <= {{top}}
    UNION ALL
    SELECT model, layer, 'best self-duality (cos(w_c, m_c))', dual_hi, token, CAST(NULL AS VARCHAR), nc3_cos FROM ranked WHERE dual_hi <= {{top}} AND nc3_cos IS NOT NULL
    UNION ALL
    SELECT model, layer, 'worst self-duality (cos(w_c, m_c))', dual_lo, token, CAST(NULL AS VARCHAR), nc3_cos FROM ranked WHERE dual_lo <= {{top}} AND nc3_cos IS NOT NULL
    UNION ALL
    SELECT model, layer, 'largest within-class variance', var_hi, token, CAST(NULL AS VARCHAR), var FROM ranked WHERE var_hi <= {{top}}
    UNION ALL
    SELECT model, layer, 'smallest within-class variance', var_lo, token, CAST(NULL AS VARCHAR), var FROM ranked WHERE var_lo <= {{top}}
    UNION ALL
    SELECT e.model AS model, e.layer AS layer,
           CASE WHEN e.kind = 'max' THEN 'most interfering pairs' ELSE 'least interfering pairs' END AS list,
           CAST(e.rank AS BIGINT) AS rank, a.token AS token, b.token AS token_b, e.value AS value
    FROM pair_extremes e
    JOIN {{selection}} s ON e.model = s.model AND e.split = s.split AND e.layer = s.layer
    JOIN class_metrics a ON a.model = e.model AND a.split = e.split AND a.layer = e.layer AND a.class_id = e.class_a
    JOIN class_metrics b ON b.model = e.model AND b.split = e.split AND b.layer = e.layer AND b.class_id = e.class_b
    WHERE e.metric = 'interference' AND e.rank <= {{top}}
)
SELECT model, layer, list, CAST(rank AS BIGINT) AS rank, token, token_b, value
FROM lists
ORDER BY model, layer, list, rank
