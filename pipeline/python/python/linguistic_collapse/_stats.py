"""Per-class statistics of hidden states from any numpy array or torch
tensor, accumulated as ``collect`` accumulates them and written to the lake
as ``collect`` writes them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Union

from . import _native, _torch

from ._lake import as_lake

if TYPE_CHECKING:
    from ._lake import Lake


def _native_lake(lake: Union["Lake", str]) -> Any:
    return as_lake(lake)._native


def _numpy() -> Any:
    """numpy, imported on first use: the `pipeline` command and a plain
    `import linguistic_collapse` do not pay for it."""
    import numpy

    return numpy


def _labels_array(labels: Any) -> Any:
    """Labels as a host numpy array (a torch tensor is moved if it must be)."""
    np = _numpy()
    if _torch.is_tensor(labels):
        return labels.detach().cpu().numpy()
    if isinstance(labels, np.ndarray):
        return labels
    if isinstance(labels, (list, tuple)):
        return np.asarray(labels)
    raise TypeError(f"labels: expected a numpy array or a torch tensor of integers, got {type(labels).__name__}")


class ClassStats(_native.ClassStats):
    """Running per-class count, mean and M2 (the sum of squared distances to
    the class mean) of ``dim``-wide hidden states of classes
    ``0 .. num_classes-1``, in f64, with ``collect``'s arithmetic: each batch
    is reduced per class, then merged into the totals with Chan's formula.

    ``update(hidden, labels)`` takes a numpy array or a torch tensor:

    - numpy arrays and torch tensors on the CPU (float16, bfloat16, float32,
      float64; C-contiguous) are read in place, never copied, with the GIL
      released and every core working;
    - tensors on another device (CUDA) are reduced there to the batch's
      per-class moments, and only those ([classes in the batch, dim]) cross
      to the host: see ``update``'s ``reduce`` for how precision is kept.

    Statistics from several processes or GPUs combine with ``merge`` and
    pickle exactly. ``write`` commits them to a lake as ``class_stats``, so
    ``analyze``, ``status`` and SQL take them as if ``collect`` had made
    them.
    """

    def update(self, hidden: Any, labels: Any, ignore_index: int = -100, *, reduce: str = "auto") -> None:
        """Accumulate one batch.

        ``hidden``: [N, dim] or [B, T, dim] floats, a numpy array or a torch
        tensor. ``labels``: [N] or [B, T] integers in ``0 .. num_classes-1``;
        entries equal to ``ignore_index`` (Hugging Face's masked label) are
        skipped. A rejected batch (``ValueError``/``TypeError`` naming the
        argument) leaves the statistics unchanged.

        ``reduce`` chooses where the batch is reduced per class:

        - ``"host"``: by the engine, in f64, reading the CPU buffer in place;
        - ``"device"``: by torch on the tensor's device. Per-class sums are
          accumulated in float64 there (float32 on Apple's MPS, which has no
          float64), in chunks of rows upcast one at a time, then a second
          pass sums the squared distances to those means, so M2 is centred
          before any rounding; only the moments reach the host, where they
          are Chan-merged in f64 like every other batch;
        - ``"auto"`` (default): ``"device"`` for tensors off the CPU,
          ``"host"`` otherwise.
        """
        if reduce not in ("auto", "host", "device"):
            raise ValueError(f"reduce: expected 'auto', 'host' or 'device', got {reduce!r}")
        if _torch.is_tensor(hidden):
            on_cpu = hidden.device.type == "cpu"
            if reduce == "device" or (reduce == "auto" and not on_cpu):
                moments = _torch.device_moments(hidden, labels, ignore_index, self.num_classes, self.dim)
                if moments is not None:
                    self._merge_moments(*moments)
                return
            if not on_cpu:
                raise ValueError(
                    f"hidden: reduce='host' needs a CPU tensor, got one on {hidden.device} (use reduce='device')"
                )
            array, bfloat16 = _torch.host_view(hidden, self.dim)
            self._update_host(array, _labels_array(labels), ignore_index, bfloat16)
            return
        if reduce == "device":
            raise ValueError(f"hidden: reduce='device' needs a torch tensor, got {type(hidden).__name__}")
        if not isinstance(hidden, _numpy().ndarray):
            raise TypeError(f"hidden: expected a numpy array or a torch tensor, got {type(hidden).__name__}")
        self._update_host(hidden, _labels_array(labels), ignore_index, False)

    def write(
        self,
        lake: Union["Lake", str],
        model: str,
        dataset: Optional[str],
        split: str,
        layer: int,
        *,
        force: bool = False,
    ) -> Dict[str, Any]:
        """Commit the statistics as ``class_stats/model=MODEL/split=SPLIT/
        layer=LAYER`` in ``lake`` (a ``Lake`` or its URL), exactly as
        ``collect`` commits its own: the same schema, a manifest, a content
        hash, atomically. Then ``lake.run("analyze", model=MODEL,
        split=SPLIT, layer=LAYER)`` computes every metric of them.

        ``dataset`` names the lake dataset whose tokenizer gave the class ids
        (analyze then shows each class's token text), or is ``None``.
        ``layer`` is the hidden-state index as in Hugging Face's
        ``hidden_states`` (0 = embeddings).

        Writing the same statistics again changes nothing. Different
        statistics for an existing partition, or beside layers that
        ``collect`` computed for the same model and split, are refused
        (``PipelineError``): they cannot be recomputed from the lake, so they
        are only replaced with ``force=True``. Returns the manifest, with
        ``"up_to_date"`` telling whether it was already there.
        """
        if isinstance(layer, bool) or not isinstance(layer, (int, _numpy().integer)) or layer < 0:
            raise TypeError(f"layer: expected a non-negative integer, got {layer!r}")
        up_to_date, manifest = self._write(_native_lake(lake), model, dataset, split, int(layer), force)
        manifest["up_to_date"] = up_to_date
        return manifest


def write_classifier(lake: Union["Lake", str], model: str, weight: Any, *, force: bool = False) -> Dict[str, Any]:
    """Commit a model's output-layer rows ``weight`` [num_classes, dim] (row
    c scores class c; e.g. ``model.get_output_embeddings().weight``) as
    ``classifiers/model=MODEL``, for a model whose weights the lake does not
    hold. ``analyze`` then computes NC3 (``cos(w_c, m_c)``) from them; it
    needs no bias, and none is stored. Rows are stored as float32, the width
    of the weights they come from.

    ``weight`` is a numpy array or a torch tensor on any device. Writing the
    same rows again changes nothing; different rows are refused unless
    ``force=True``, and so is a model whose weights the lake holds (analyze
    reads those). Returns the manifest, with ``"up_to_date"``.
    """
    np = _numpy()
    if _torch.is_tensor(weight):
        weight = _torch.to_float32_numpy(weight)
    elif not isinstance(weight, np.ndarray):
        raise TypeError(f"weight: expected a numpy array or a torch tensor, got {type(weight).__name__}")
    if weight.ndim != 2:
        raise ValueError(f"weight: expected [num_classes, dim], got shape {list(weight.shape)}")
    if weight.dtype.kind != "f":
        raise TypeError(f"weight: expected floats, got dtype {weight.dtype}")
    rows = np.ascontiguousarray(weight, dtype=np.float32)
    up_to_date, manifest = _native.write_classifier(_native_lake(lake), model, rows, force)
    manifest["up_to_date"] = up_to_date
    return manifest


__all__ = ["ClassStats", "write_classifier"]
