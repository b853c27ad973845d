"""torch tensors for ``ClassStats``, without importing torch: a tensor is
recognised by its type, and torch is taken from ``sys.modules`` (the caller
has imported it to make the tensor).

Two paths: a CPU tensor is viewed as a numpy array over the same memory
(bfloat16, which numpy lacks, as the int16 view of its bits) for the
engine's f64 reduction; a tensor on any device can instead be reduced there
to per-class moments (``device_moments``), the only data that then crosses
to the host. The tests run the device path on CPU tensors: it is the same
torch code on every device."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Optional, Tuple

if TYPE_CHECKING:
    import numpy as np

# Rows upcast at a time on the device: at most this many values (128 MB
# of float64), whatever the batch.
_CHUNK_VALUES = 1 << 24

_HOST_DTYPES = ("float16", "bfloat16", "float32", "float64")


def is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _dtype_name(t: Any) -> str:
    return str(t.dtype).replace("torch.", "")


def _check_hidden(hidden: Any, dim: int) -> None:
    shape = list(hidden.shape)
    if len(shape) not in (2, 3) or shape[-1] != dim:
        raise ValueError(f"hidden: expected shape [N, {dim}] or [B, T, {dim}], got {shape}")
    if _dtype_name(hidden) not in _HOST_DTYPES:
        raise TypeError(f"hidden: expected float16, bfloat16, float32 or float64, got dtype {hidden.dtype}")


def host_view(hidden: Any, dim: int) -> Tuple["np.ndarray", bool]:
    """A CPU tensor as a numpy array over its memory, and whether it holds
    bfloat16 bits."""
    torch = sys.modules["torch"]
    _check_hidden(hidden, dim)
    t = hidden.detach()
    if not t.is_contiguous():
        raise ValueError(
            "hidden: expected a C-contiguous tensor (.contiguous() copies a strided view; to drop the last "
            "position, pass the whole tensor with labels shifted and padded with ignore_index instead of a slice)"
        )
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy(), True
    return t.numpy(), False


def to_float32_numpy(t: Any) -> "np.ndarray":
    if not t.dtype.is_floating_point:
        raise TypeError(f"weight: expected floats, got dtype {t.dtype}")
    return t.detach().to(device="cpu", dtype=sys.modules["torch"].float32).numpy()


def _check_labels(torch: Any, labels: Any, n: int, shape: Any) -> Any:
    if not is_tensor(labels):
        import numpy

        labels = torch.as_tensor(numpy.asarray(labels))
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected integers, got dtype {labels.dtype}")
    if labels.numel() != n:
        raise ValueError(f"labels: {labels.numel()} labels for {n} hidden states (shape {list(shape)})")
    return labels.reshape(-1)


def device_moments(
    hidden: Any, labels: Any, ignore_index: int, num_classes: int, dim: int
) -> Optional[Tuple["np.ndarray", "np.ndarray", "np.ndarray", "np.ndarray"]]:
    """The batch reduced on ``hidden``'s device to the per-class moments of
    its kept rows: (classes [K] int64, counts [K] int64, means [K, dim]
    float64, m2 [K] float64), on the host; ``None`` when every label is
    ``ignore_index``. Checks everything before computing."""
    torch = sys.modules["torch"]
    _check_hidden(hidden, dim)
    shape = tuple(hidden.shape)
    n = 1
    for size in shape[:-1]:
        n *= int(size)
    h = hidden.detach().reshape(n, dim)
    y = _check_labels(torch, labels, n, shape).to(device=h.device, dtype=torch.int64)
    keep = y != ignore_index
    outside = keep & ((y < 0) | (y >= num_classes))
    if bool(outside.any()):
        i = int(torch.nonzero(outside)[0, 0])
        raise ValueError(
            f"labels: label {int(y[i])} at position {i} is outside 0..{num_classes} (and not ignore_index={ignore_index})"
        )
    # Ignored rows go to a class past the last, dropped at the end.
    classes, inverse = torch.unique(torch.where(keep, y, num_classes), return_inverse=True)
    acc = torch.float32 if h.device.type == "mps" else torch.float64
    k = classes.numel()
    sums = torch.zeros(k, dim, dtype=acc, device=h.device)
    step = max(1, _CHUNK_VALUES // dim)
    for s in range(0, n, step):
        sums.index_add_(0, inverse[s : s + step], h[s : s + step].to(acc))
    counts = torch.bincount(inverse, minlength=k)
    means = sums / counts.unsqueeze(1).to(acc)
    m2 = torch.zeros(k, dtype=acc, device=h.device)
    for s in range(0, n, step):
        idx = inverse[s : s + step]
        dev = h[s : s + step].to(acc) - means[idx]
        m2.index_add_(0, idx, (dev * dev).sum(dim=1))
    if int(classes[-1]) == num_classes:
        classes, counts, means, m2 = classes[:-1], counts[:-1], means[:-1], m2[:-1]
    if classes.numel() == 0:
        return None

    def host(t: Any, dtype: Any) -> "np.ndarray":
        return t.to(dtype).cpu().contiguous().numpy()

    return (
        host(classes, torch.int64),
        host(counts, torch.int64),
        host(means, torch.float64),
        host(m2, torch.float64),
    )
