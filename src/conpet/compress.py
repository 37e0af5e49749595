"""ComPEFT: compress a weight update to a sparse ternary tensor and store it packed.

Yadav, P., Choshen, L., Raffel, C., & Bansal, M. (2023). ComPEFT: Compression for
Communicating Parameter Efficient Updates via Sparsification and Quantization.
arXiv:2311.13171.

For an update ``tau`` (one tensor), ComPEFT keeps the top-k ``|tau|`` (``density`` k) and
replaces every kept magnitude with ONE scalar per tensor::

    tau_hat = alpha * std(tau) * sign(tau) * m_k

where ``std`` is the standard deviation of the original dense ``tau`` (not the mean absolute
value) and ``alpha`` is tuned per task (large models need little tuning). Choices made here
where the paper leaves room (see the reference notes, which mark them unverified):

- the scale is per tensor and ``std`` is torch's default, unbiased (divides by ``n - 1``),
  computed in float64 and stored as a Python float (JSON round-trips it exactly);
- exactly ``round(density * numel)`` entries are kept (at least 1 if ``density > 0``), ties in
  magnitude broken by index order; kept entries that are exactly 0 are not stored (they
  decompress to 0 anyway), so the stored count can be lower than the kept count.

Packed layout of one tensor (``CompressedTensor``), all ``uint8``:

- ``positions``: which flat indices are non-zero, either a ``"bitmap"`` (one bit per entry,
  ``ceil(numel / 8)`` bytes) or ``"indices"`` (the sorted flat indices as little-endian
  unsigned integers of 1, 2 or 4 bytes, the smallest width that holds ``numel - 1``);
  ``layout="auto"`` picks the smaller, so very sparse tensors store indices;
- ``signs``: one bit per stored entry, in increasing index order, 1 = negative.

Bits are packed little-endian within each byte (``numpy.packbits(bitorder="little")``). At
density 0.1 the bitmap layout takes ``(n + 0.1 n) / 8`` bytes, about 1/29 of dense fp32.

Files are safetensors (no pickle): tensors ``"<name>::positions"`` and ``"<name>::signs"`` and
one metadata entry ``"conpet.compeft"`` holding JSON ``{"version": 1, "tensors": {name:
{shape, dtype, scale, layout, index_bytes, stored, density, alpha}}}``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from conpet.errors import ConfigError, ModelError
from conpet.runs import atomic_write_bytes, check_safe_folder
from conpet.sparsify import keep_count, ranks_by_magnitude

__all__ = [
    "COMPEFT_PAPER",
    "CompressedTensor",
    "StorageSize",
    "compress_tensor",
    "decompress",
    "compress_state",
    "decompress_state",
    "save_compressed",
    "load_compressed",
]

COMPEFT_PAPER = (
    "Yadav, P., Choshen, L., Raffel, C., & Bansal, M. (2023). ComPEFT: Compression for "
    "Communicating Parameter Efficient Updates via Sparsification and Quantization. "
    "arXiv:2311.13171"
)

METADATA_KEY = "conpet.compeft"
FORMAT_VERSION = 1
_SEPARATOR = "::"
_LAYOUTS = ("bitmap", "indices")


@dataclass(frozen=True)
class CompressedTensor:
    """One ComPEFT-compressed tensor: ``scale * sign`` at the stored positions, 0 elsewhere.

    ``positions`` and ``signs`` are packed ``uint8`` tensors (see the module docstring);
    ``stored`` is how many entries are non-zero; ``density`` and ``alpha`` record how it was made.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    scale: float
    layout: str
    index_bytes: int
    stored: int
    positions: Tensor
    signs: Tensor
    density: float
    alpha: float

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def packed_nbytes(self) -> int:
        """Bytes of the packed codes (positions + signs), without file headers."""
        return self.positions.numel() + self.signs.numel()

    @property
    def dense_fp32_nbytes(self) -> int:
        return 4 * self.numel


@dataclass(frozen=True)
class StorageSize:
    """What :func:`save_compressed` wrote: file size vs the same tensors dense in fp32."""

    path: Path
    bytes_on_disk: int
    dense_fp32_bytes: int

    @property
    def ratio(self) -> float:
        """Dense fp32 bytes per byte on disk (the compression factor)."""
        return self.dense_fp32_bytes / self.bytes_on_disk if self.bytes_on_disk else math.inf


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelError(f"{where}: unknown floating dtype {name!r}")
    return dtype


def _index_bytes(numel: int) -> int:
    if numel <= 1 << 8:
        return 1
    if numel <= 1 << 16:
        return 2
    return 4


def _pack_bits(bits: np.ndarray) -> Tensor:
    return torch.from_numpy(np.packbits(bits.astype(bool), bitorder="little").copy())


def _unpack_bits(packed: Tensor, count: int) -> np.ndarray:
    return np.unpackbits(packed.numpy(), count=count, bitorder="little").astype(bool)


def _stored_indices(ct: CompressedTensor) -> np.ndarray:
    """Sorted flat indices of the non-zero entries."""
    if ct.layout == "bitmap":
        return np.flatnonzero(_unpack_bits(ct.positions, ct.numel))
    dtype = np.dtype(f"<u{ct.index_bytes}")
    return ct.positions.numpy().view(dtype).astype(np.int64)


def compress_tensor(
    t: Tensor, density: float, *, alpha: float = 1.0, layout: str = "auto"
) -> CompressedTensor:
    """ComPEFT-compress ``t``: keep the ``density`` largest ``|t|`` as ``sign * alpha * std(t)``.

    ``layout`` is ``"bitmap"``, ``"indices"`` or ``"auto"`` (the smaller of the two).
    """
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise ConfigError(f"compress_tensor: expected a floating-point tensor, got {t!r:.60}")
    if not isinstance(density, (int, float)) or not 0.0 <= density <= 1.0:
        raise ConfigError(f"compress_tensor: density must be in [0, 1], got {density!r}")
    if not isinstance(alpha, (int, float)) or not (alpha >= 0 and math.isfinite(alpha)):
        raise ConfigError(f"compress_tensor: alpha must be a finite number >= 0, got {alpha!r}")
    if layout not in (*_LAYOUTS, "auto"):
        raise ConfigError(
            f"compress_tensor: layout must be bitmap, indices or auto, got {layout!r}"
        )

    flat = t.detach().reshape(-1).to("cpu", torch.float64)
    n = flat.numel()
    std = float(flat.std()) if n > 1 else 0.0
    scale = float(alpha) * std

    k = keep_count(density, n)
    order = ranks_by_magnitude(flat)
    kept = order[n - k :] if k else order[:0]
    kept = kept[flat[kept] != 0]
    indices = np.sort(kept.numpy())
    negative = flat.numpy()[indices] < 0

    width = _index_bytes(n)
    bitmap_bytes = (n + 7) // 8
    indices_bytes = width * len(indices)
    if layout == "auto":
        layout = "indices" if indices_bytes < bitmap_bytes else "bitmap"
    if layout == "bitmap":
        bits = np.zeros(n, dtype=bool)
        bits[indices] = True
        positions = _pack_bits(bits)
    else:
        raw = indices.astype(f"<u{width}").view(np.uint8)
        positions = torch.from_numpy(raw.copy())
    return CompressedTensor(
        shape=tuple(t.shape),
        dtype=t.dtype,
        scale=scale,
        layout=layout,
        index_bytes=width,
        stored=len(indices),
        positions=positions,
        signs=_pack_bits(negative),
        density=float(density),
        alpha=float(alpha),
    )


def decompress(ct: CompressedTensor) -> Tensor:
    """The dense tensor ``ct`` stands for: ``sign * scale`` at stored positions, 0 elsewhere.

    Values are ``+scale`` / ``-scale`` cast to ``ct.dtype``; the result is identical before and
    after a save/load round trip.
    """
    indices = torch.from_numpy(_stored_indices(ct))
    negative = torch.from_numpy(_unpack_bits(ct.signs, ct.stored))
    magnitude = torch.tensor(ct.scale, dtype=torch.float64)
    values = torch.where(negative, -magnitude, magnitude).to(ct.dtype)
    out = torch.zeros(ct.numel, dtype=ct.dtype)
    out[indices] = values
    return out.reshape(ct.shape)


def compress_state(
    state: Mapping[str, Tensor], density: float, *, alpha: float = 1.0, layout: str = "auto"
) -> dict[str, CompressedTensor]:
    """:func:`compress_tensor` on every tensor of a state dict (one scale per tensor)."""
    return {
        name: compress_tensor(t, density, alpha=alpha, layout=layout) for name, t in state.items()
    }


def decompress_state(compressed: Mapping[str, CompressedTensor]) -> dict[str, Tensor]:
    """:func:`decompress` on every entry."""
    return {name: decompress(ct) for name, ct in compressed.items()}


def save_compressed(
    compressed: Mapping[str, CompressedTensor], path: str | os.PathLike
) -> StorageSize:
    """Write ``compressed`` to one safetensors file, atomically (temp file in the same folder,
    flush, fsync, ``os.replace``). Returns the size on disk vs dense fp32."""
    from safetensors.torch import save

    tensors: dict[str, Tensor] = {}
    header: dict[str, dict] = {}
    for name, ct in compressed.items():
        if _SEPARATOR in name:
            raise ConfigError(
                f"save_compressed: tensor name {name!r} must not contain {_SEPARATOR!r}"
            )
        tensors[f"{name}{_SEPARATOR}positions"] = ct.positions.contiguous()
        tensors[f"{name}{_SEPARATOR}signs"] = ct.signs.contiguous()
        header[name] = {
            "shape": list(ct.shape),
            "dtype": _dtype_name(ct.dtype),
            "scale": ct.scale,
            "layout": ct.layout,
            "index_bytes": ct.index_bytes,
            "stored": ct.stored,
            "density": ct.density,
            "alpha": ct.alpha,
        }
    metadata = {METADATA_KEY: json.dumps({"version": FORMAT_VERSION, "tensors": header})}
    written = atomic_write_bytes(path, save(tensors, metadata=metadata))
    dense = sum(ct.dense_fp32_nbytes for ct in compressed.values())
    return StorageSize(written, written.stat().st_size, dense)


def load_compressed(path: str | os.PathLike) -> dict[str, CompressedTensor]:
    """Read a file written by :func:`save_compressed` (safetensors only, never pickle)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such compressed-update file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
    if METADATA_KEY not in metadata:
        raise ModelError(
            f"{path}: no {METADATA_KEY!r} metadata; it was not written by conpet's save_compressed"
        )
    try:
        info = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: corrupt {METADATA_KEY!r} metadata ({e})") from None
    if info.get("version") != FORMAT_VERSION:
        raise ModelError(
            f"{path}: compressed format version {info.get('version')!r} is not {FORMAT_VERSION}; "
            "upgrade conpet to read it"
        )

    out: dict[str, CompressedTensor] = {}
    for name, meta in info["tensors"].items():
        where = f"{path}: tensor {name!r}"
        try:
            positions = tensors[f"{name}{_SEPARATOR}positions"]
            signs = tensors[f"{name}{_SEPARATOR}signs"]
        except KeyError as e:
            raise ModelError(f"{where}: missing packed tensor {e.args[0]!r}") from None
        codes_ok = positions.dtype == torch.uint8 and signs.dtype == torch.uint8
        if meta.get("layout") not in _LAYOUTS or not codes_ok:
            raise ModelError(f"{where}: bad layout {meta.get('layout')!r} or non-uint8 codes")
        out[name] = CompressedTensor(
            shape=tuple(int(s) for s in meta["shape"]),
            dtype=_dtype_from_name(meta["dtype"], where),
            scale=float(meta["scale"]),
            layout=meta["layout"],
            index_bytes=int(meta["index_bytes"]),
            stored=int(meta["stored"]),
            positions=positions,
            signs=signs,
            density=float(meta["density"]),
            alpha=float(meta["alpha"]),
        )
    return out


# -- ComPEFT-compressed LoRA folders -----------------------------------------------------------------
COMPRESSED_FILE = "adapter_model.compeft.safetensors"


def compress_lora_folder(src: Path, dst: Path, density: float, alpha: float = 1.0) -> tuple[int, int]:
    """Write ``dst`` (exists, empty) as ``src`` with its LoRA weights ComPEFT-compressed
    (:mod:`conpet.compress`: top-``density`` magnitudes of each tensor as ``sign * alpha * std``,
    packed); other files (heads, configs) are copied. Returns (bytes of ``src``'s
    ``adapter_model.safetensors``, bytes of the compressed file).

    Deviation, named: ComPEFT compresses the update ``theta_ft - theta_init``; peft initialises
    LoRA's A randomly and does not store that initialisation, so A and B are compressed as they
    are (B's initialisation is 0, so for B it is exactly the update)."""
    check_safe_folder(src)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    size = save_compressed(compress_state({k: v.float() for k, v in tensors.items()}, density, alpha=alpha),
                           dst / COMPRESSED_FILE)
    for f in src.iterdir():
        if f.is_file() and f.name != "adapter_model.safetensors":
            shutil.copy2(f, dst / f.name)
    return (src / "adapter_model.safetensors").stat().st_size, size.bytes_on_disk


def decompress_lora_folder(src: Path, dst: Path) -> None:
    """Write a plain peft folder ``dst`` (exists) from a compressed one: the stored values exactly."""
    save_file({k: v.contiguous() for k, v in decompress_state(load_compressed(src / COMPRESSED_FILE)).items()},
              str(dst / "adapter_model.safetensors"))
    if Path(src).resolve() == Path(dst).resolve():
        return
    for f in src.iterdir():
        if f.is_file() and f.name not in (COMPRESSED_FILE, "adapter_model.safetensors"):
            shutil.copy2(f, dst / f.name)


def is_compressed(folder: Path) -> bool:
    return (Path(folder) / COMPRESSED_FILE).is_file() and not (Path(folder) / "adapter_model.safetensors").exists()
