"""Hugging Face causal LMs into the lake: ``collect`` runs a ``transformers``
model over a dataset's packed chunks and writes what the CLI's ``collect``
writes, through ``ClassStats``.

Samples are the CLI's: for each chunk x_1..x_T (in chunk order), the hidden
state at positions 1..T-1 is labelled by the next token. Layers count as
the CLI counts them: 0 is the embedding output, i the output of block i,
and L (``"last"``) the input of the output layer, after the final norm.
torch and transformers are the caller's: this module imports neither until
it runs (``pip install "linguistic-collapse[torch]"``)."""

from __future__ import annotations

import hashlib
from contextlib import closing
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

from . import _native
from ._progress import bar
from ._stats import ClassStats, _numpy, write_classifier

from ._lake import as_lake

if TYPE_CHECKING:
    from ._lake import Lake


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - the tests have torch
        raise ImportError(
            'linguistic_collapse.collect needs torch and transformers: pip install "linguistic-collapse[torch]"'
        ) from e
    return torch


def _chunks(lake: "Lake", dataset: str, split: str) -> Any:
    """The split's chunks as a [S, T] int64 array, in chunk order."""
    np = _numpy()
    table = lake.table("chunks", dataset=dataset, split=split)
    if table.num_rows == 0:
        raise ValueError(
            f"dataset, split: no chunks for dataset={dataset!r} split={split!r} in {lake.url} (run pack first)"
        )
    table = table.sort_by("chunk_id")
    tokens = table.column("tokens").combine_chunks()
    t = tokens.type.list_size
    return np.asarray(tokens.flatten(), dtype=np.int64).reshape(table.num_rows, t)


def _layers(layers: Union[str, int, Sequence[int]], num_layers: int) -> List[int]:
    if layers == "last":
        return [num_layers]
    if layers == "all":
        return list(range(num_layers + 1))
    chosen = [layers] if isinstance(layers, int) else list(layers)
    for layer in chosen:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= num_layers:
            raise ValueError(
                f"layers: expected 'last', 'all' or hidden-state indices in 0..{num_layers}, got {layers!r}"
            )
    return sorted(set(chosen))


def _output_layer(model: Any, chunks: Any, dataset: str) -> Any:
    """The model's output layer, once its rows are known to cover every
    token id of the chunks (checked before the first batch)."""
    output = model.get_output_embeddings()
    if output is None:
        raise ValueError("model: expected a causal LM with an output layer (get_output_embeddings() is None)")
    vocab = output.weight.shape[0]
    top = int(chunks.max())
    if top >= vocab:
        raise ValueError(
            f"model: its output layer scores {vocab} classes but {dataset!r} holds token id {top}: "
            "the dataset was tokenized for another vocabulary"
        )
    return output


def _backbone(model: Any) -> Any:
    """The model without its output layer (no logits are computed)."""
    base = getattr(model, "base_model", None)
    return model if base is None else base


def _positive(name: str, value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive {what}, got {value!r}")


class _Pass:
    """What every pass of a model over a split's chunks needs, checked
    before the first batch: the lake, the chunks [S, T], the model's output
    layer (its rows cover every token id), the device."""

    def __init__(self, model: Any, lake: Union["Lake", str], dataset: str, split: str, batch: int, device: Any):
        self.torch = _torch()
        self.lake = as_lake(lake)
        _positive("batch", batch, "integer")
        self.batch = batch
        self.chunks = _chunks(self.lake, dataset, split)
        self.output = _output_layer(model, self.chunks, dataset)
        self.device = (
            self.torch.device(device) if device is not None else next(model.parameters()).device
        )
        self.num_layers = int(model.config.num_hidden_layers)
        model.eval()

    def batches(self, forward: Any, desc: str, quiet: bool, first: int = 0, before: Any = None) -> Any:
        """(token ids, forward(ids)) per batch of chunks from chunk `first`,
        without gradients, with a progress bar in tokens; `before(start)`
        runs before each batch's forward. Use it under
        ``contextlib.closing``: the consumer's work runs inside its
        inference mode, which must end when the consumer stops, even on an
        error."""
        torch = self.torch
        n_chunks, t = self.chunks.shape
        progress = bar(desc, n_chunks * (t - 1), "tok", quiet)
        progress.update(first * (t - 1))
        try:
            with torch.inference_mode():
                for start in range(first, n_chunks, self.batch):
                    if before is not None:
                        before(start)
                    ids = torch.from_numpy(self.chunks[start : start + self.batch]).to(self.device)
                    yield ids, forward(ids)
                    progress.update(ids.shape[0] * (t - 1))
        finally:
            progress.close()

    def state_at(self, out: Any, layer: int) -> Any:
        """Hidden state `layer` of a backbone's output (checked): the last
        is the backbone's last state, the output layer's input (a model
        without a backbone gives it as its last hidden state)."""
        hidden = getattr(out, "hidden_states", None)
        if hidden is None or len(hidden) != self.num_layers + 1:
            got = "none" if hidden is None else f"{len(hidden)}"
            raise ValueError(f"model: expected {self.num_layers + 1} hidden_states from its forward, got {got}")
        last = getattr(out, "last_hidden_state", None)
        return last if layer == self.num_layers and last is not None else hidden[layer]


def _hidden_states(model: Any) -> Any:
    """The backbone's forward with every hidden state (no logits)."""
    backbone = _backbone(model)
    return lambda ids: backbone(input_ids=ids, output_hidden_states=True)


def _fingerprint(model: Any) -> str:
    """A cheap identity of a model's weights, for resuming: its config, every
    parameter's name, shape and dtype, and 64 rows of its output layer (a
    full hash would read every weight on each call)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(model.config.to_json_string().encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    w = model.get_output_embeddings().weight
    sample = w[:: max(1, w.shape[0] // 64)].detach().float().cpu().contiguous()
    h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _resume_key(model_id: str, split: str) -> str:
    return f"partials/collect-python/model={model_id}/split={split}.resume.safetensors"


def collect(
    model: Any,
    lake: Union["Lake", str],
    model_id: str,
    dataset: str,
    split: str = "train",
    layers: Union[str, int, Sequence[int]] = "last",
    batch: int = 8,
    device: Optional[str] = None,
    *,
    checkpoint_every: int = 256,
    force: bool = False,
    quiet: bool = False,
) -> Dict[str, Any]:
    """Per-class statistics of a ``transformers`` causal LM's hidden states
    over ``dataset``'s packed ``split`` in the lake, written as
    ``class_stats/model=MODEL_ID/split=SPLIT/layer=L`` for each chosen
    layer, with the model's output-layer rows (for NC3) when the lake does
    not hold its weights. Then ``lake.run("analyze", model=MODEL_ID,
    layer=L)`` computes every metric, as for the lake's own models.

    ``model``: a loaded causal LM whose forward returns ``hidden_states``.
    ``layers``: ``"last"`` (the output layer's input), ``"all"``, or indices
    (0 = embeddings). ``batch`` chunks run per forward, on ``device``
    (default: where the model's parameters are); memory holds one batch's
    hidden states at a time. Hidden states on a GPU are reduced there.

    Every ``checkpoint_every`` chunks the running statistics are saved to
    the lake as one object (``partials/collect-python/...``); a call
    interrupted (KeyboardInterrupt, a lost job) leaves no half artifact, and
    the next call with the same model, data, layers and batch resumes from
    the last checkpoint and ends with the same statistics, bit for bit, as
    an uninterrupted call. ``force=True`` starts afresh and replaces
    statistics written before. Returns ``{"tokens", "samples", "layers",
    "resumed_from", "manifests"}``.
    """
    run = _Pass(model, lake, dataset, split, batch, device)
    lake = run.lake
    vocab, dim = run.output.weight.shape
    chosen = _layers(layers, run.num_layers)
    _positive("checkpoint_every", checkpoint_every, "number of chunks")

    # Resume only what the same model, data, layers and batching began.
    chunks_hash = lake._native._content_hash("chunks", [("dataset", dataset), ("split", split)]) or ""
    identity = "|".join([model_id, dataset, split, str(chosen), str(batch), chunks_hash, _fingerprint(model)])
    state_id = hashlib.blake2b(identity.encode(), digest_size=16).hexdigest()
    key = _resume_key(model_id, split)
    stats = {layer: ClassStats(vocab, dim) for layer in chosen}
    first = 0
    saved = None if force else _native.load_state(lake._native, key)
    if saved is not None and saved[2].get("state_id") == state_id:
        for layer, state in zip(saved[0], saved[1]):
            stats[layer].__setstate__(state)
        first = int(saved[2]["next_chunk"])

    # Checkpoints fall on batch boundaries, so resumed batches are the same.
    every = max(1, checkpoint_every // batch) * batch

    def checkpoint(start: int) -> None:
        if start > first and start % every == 0:
            meta = {"state_id": state_id, "next_chunk": str(start), "model_id": model_id}
            _native.save_state(lake._native, key, chosen, [stats[layer] for layer in chosen], meta)

    desc = f"collect {model_id} on {dataset}/{split}"
    with closing(run.batches(_hidden_states(model), desc, quiet, first, before=checkpoint)) as batches:
        for ids, out in batches:
            # h_t is labelled by x_{t+1}; the last position has no label.
            labels = run.torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
            for layer in chosen:
                stats[layer].update(run.state_at(out, layer), labels)

    manifests = []
    for layer in chosen:
        manifests.append(stats[layer].write(lake, model_id, dataset, split, layer, force=force))
    if not lake._native._holds_weights(model_id):
        manifests.append(write_classifier(lake, model_id, run.output.weight, force=force))
    _native.delete_state(lake._native, key)
    samples = stats[chosen[0]].samples
    return {
        "tokens": int(run.chunks.size),
        "samples": samples,
        "layers": chosen,
        "resumed_from": first,
        "manifests": manifests,
    }


def _n_params(model: Any) -> int:
    """Parameters, each tensor once (a tied embedding counts once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def evaluate(
    model: Any,
    lake: Union["Lake", str],
    model_id: str,
    dataset: str,
    split: str = "validation",
    batch: int = 8,
    device: Optional[str] = None,
    *,
    force: bool = False,
    quiet: bool = False,
) -> Dict[str, Any]:
    """Validation loss, accuracy and perplexity of a ``transformers`` causal
    LM over ``dataset``'s packed ``split``, written as the ``models`` row of
    ``MODEL_ID`` as the CLI's ``eval`` writes its own: the mean next-token
    cross-entropy over every position with a next token (nats, full
    vocabulary, summed in f64), top-1 accuracy, ``exp`` of the loss, and
    the architecture (depth, width, heads, vocabulary, parameters with a
    tied embedding counted once). ``model_metrics`` then joins them to the
    neural-collapse metrics, and ``correlate`` and ``report`` take the model
    like the lake's own. Returns the row (a dict) and its manifest.
    """
    run = _Pass(model, lake, dataset, split, batch, device)
    lake, torch, np = run.lake, run.torch, _numpy()
    vocab = run.output.weight.shape[0]
    loss_sum, correct, samples = 0.0, 0, 0
    logits_of = lambda ids: model(input_ids=ids).logits  # noqa: E731
    with closing(run.batches(logits_of, f"eval {model_id} on {dataset}/{split}", quiet)) as batches:
        for ids, logits in batches:
            logits = logits[:, :-1].float()
            target = ids[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
            )
            loss_sum += float(nll.double().sum())
            correct += int((logits.argmax(dim=-1) == target).sum())
            samples += target.numel()

    config = model.config
    val_loss = loss_sum / samples
    row = {
        "name": model_id,
        "depth": int(config.num_hidden_layers),
        "width": int(config.hidden_size),
        "heads": int(config.num_attention_heads),
        "vocab_size": int(vocab),
        "n_params": _n_params(model),
        "dataset": dataset,
        "val_samples": samples,
        "val_loss": val_loss,
        "val_acc": correct / samples,
        "perplexity": float(np.exp(val_loss)),
        "source": str(getattr(config, "_name_or_path", "") or type(model).__name__),
    }
    import pyarrow as pa

    table = pa.table({k: [v] for k, v in row.items()})
    up_to_date, manifest = _native.write_table(
        lake._native,
        ("models", [("model", model_id)]),
        table,
        {},
        [("chunks", [("dataset", dataset), ("split", split)])],
        {"dataset": dataset, "split": split},
        force,
    )
    manifest["up_to_date"] = up_to_date
    return {"row": row, "manifest": manifest}



def decide(
    model: Any,
    lake: Union["Lake", str],
    model_id: str,
    dataset: str,
    split: str = "validation",
    layer: Union[str, int] = "last",
    stats_split: str = "train",
    min_per_class: int = 1,
    max_per_class: int = 0,
    batch: int = 8,
    device: Optional[str] = None,
    *,
    force: bool = False,
    quiet: bool = False,
) -> Dict[str, Any]:
    """NC4 of a ``transformers`` causal LM, as the CLI's ``decide``: for every
    sample of ``dataset``'s ``split`` (positions with a next token), the
    linear decision argmax_c <w_c, h> and the nearest class centre
    argmin_c ||h - mu_c||, both over V' (classes of ``class_stats`` of
    ``stats_split`` at ``layer`` with ``min_per_class`` <= N_c, and <=
    ``max_per_class`` unless 0; ascending ids, ties to the lowest), computed
    in float64 as argmax_c (2 <h, mu_c> - ||mu_c||^2). Writes
    ``decisions/model=MODEL_ID/split=SPLIT/layer=L`` per true class
    (samples, agreements, each decision's hits, whether the class is in
    V'), which analyze turns into ``nc4_agreement``. Run ``collect`` for
    ``stats_split`` first. Returns the manifest.
    """
    run = _Pass(model, lake, dataset, split, batch, device)
    lake, torch, np, device = run.lake, run.torch, _numpy(), run.device
    output = run.output
    (chosen,) = _layers(layer if layer in ("last",) else [layer], run.num_layers)
    stats = lake.table("class_stats", model=model_id, split=stats_split, layer=chosen)
    if stats.num_rows == 0:
        raise ValueError(
            f"model_id: no class_stats for {model_id!r} on {stats_split!r} at layer {chosen} (run lc.collect first)"
        )
    stats = stats.sort_by("class_id")
    classes = stats["class_id"].to_numpy().astype(np.int64)
    counts = stats["count"].to_numpy()
    analysed = (counts >= min_per_class) & ((max_per_class == 0) | (counts <= max_per_class))
    if not analysed.any():
        raise ValueError(
            f"min_per_class, max_per_class: no class of {model_id!r} has between "
            f"{min_per_class} and {max_per_class or 'any'} samples"
        )
    v_ids = classes[analysed]
    means = np.stack(stats["mean"].to_numpy(zero_copy_only=False))[analysed]
    mu = torch.from_numpy(means).to(device=device, dtype=torch.float64)
    w = output.weight.detach()[torch.from_numpy(v_ids).to(output.weight.device)].to(device=device, dtype=torch.float64)
    mu_sq = (mu * mu).sum(dim=1)
    v_ids_dev = torch.from_numpy(v_ids).to(device)
    vocab = output.weight.shape[0]
    totals = {k: torch.zeros(vocab, dtype=torch.int64, device=device) for k in ("samples", "agree", "linear", "ncc")}
    desc = f"decide {model_id} on {dataset}/{split}"
    with closing(run.batches(_hidden_states(model), desc, quiet)) as batches:
        for ids, out in batches:
            h = run.state_at(out, chosen)
            h = h[:, :-1].reshape(-1, h.shape[-1]).to(torch.float64)
            y = ids[:, 1:].reshape(-1)
            linear = v_ids_dev[(h @ w.T).argmax(dim=1)]
            ncc = v_ids_dev[(2 * (h @ mu.T) - mu_sq).argmax(dim=1)]
            for key, hits in (
                ("samples", torch.ones_like(y)),
                ("agree", (linear == ncc).long()),
                ("linear", (linear == y).long()),
                ("ncc", (ncc == y).long()),
            ):
                totals[key].index_add_(0, y, hits)

    sums = {k: v.cpu().numpy() for k, v in totals.items()}
    seen = np.flatnonzero(sums["samples"])
    in_v = np.isin(seen, v_ids)
    import pyarrow as pa

    table = pa.table(
        {
            "class_id": seen,
            "samples": sums["samples"][seen],
            "agree": sums["agree"][seen],
            "linear_correct": sums["linear"][seen],
            "ncc_correct": sums["ncc"][seen],
            "analysed": in_v,
        }
    )
    up_to_date, manifest = _native.write_table(
        lake._native,
        ("decisions", [("model", model_id), ("split", split), ("layer", str(chosen))]),
        table,
        {"min_per_class": str(min_per_class), "max_per_class": str(max_per_class), "precision": "f64"},
        [
            ("class_stats", [("model", model_id), ("split", stats_split), ("layer", str(chosen))]),
            ("chunks", [("dataset", dataset), ("split", split)]),
        ],
        {"dataset": dataset, "classes_analysed": str(len(v_ids))},
        force,
    )
    manifest["up_to_date"] = up_to_date
    return manifest


__all__ = ["collect", "evaluate", "decide"]
