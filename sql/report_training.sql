-- kind: query
-- Training curves of the selected models: train_log is kept per trained
-- model name, the selection per checkpoint (models.name links the two).
-- Placeholders: {{selection}}.
SELECT t.model, t.step, t.loss
FROM train_log t
WHERE t.model IN (SELECT mo.name FROM models mo JOIN {{selection}} s ON mo.model = s.model)
ORDER BY t.model, t.step
