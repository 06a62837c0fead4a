"""Numeric verification: inputs from a graph's signature, runs on onnxruntime, output comparison."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from tfgraph.errors import BadInputError
from tfgraph.ir import SerializedModel  # noqa: F401 - re-exported
from tfgraph.deploy.runtime import LOG_SEVERITY, quiet_runtimes, session_options  # noqa: F401 - re-exported
from tfgraph.signature import InputInfo, _gather_index_bound, input_signature, position_limit  # noqa: F401 - re-exported

quiet_runtimes()  # before anything here imports onnxruntime

# Default sizes for symbolic dimensions, by (lower-cased) name fragment; first match wins.
DEFAULT_DIMS: tuple[tuple[str, int], ...] = (
    ("past", 4),
    ("batch", 2),
    ("seq", 16),
    ("len", 16),
    ("total", 20),
)
FALLBACK_DIM = 8


MAX_DIM = 2**31 - 1


def parse_shapes(items: Sequence[str] | None) -> dict[str, tuple[int, ...] | int]:
    """Parse ``name=1x128`` (an input's shape) or ``name=128`` (a symbolic dimension or 1-D input).
    A name given twice is refused (it would silently take the last value)."""
    shapes: dict[str, tuple[int, ...] | int] = {}
    for item in items or ():
        for part in item.split(","):
            name, eq, dims = part.partition("=")
            if not eq or not name.strip():
                raise BadInputError(f"bad shape '{part}'; expected NAME=DIMxDIM (an input) or NAME=N (a dimension)")
            try:
                values = tuple(int(d) for d in dims.lower().split("x"))
            except ValueError:
                raise BadInputError(f"bad shape '{part}'; dimensions must be integers like 2x128") from None
            if any(v < 0 for v in values):
                raise BadInputError(f"bad shape '{part}'; dimensions must not be negative (0 is allowed: an empty past)")
            if any(v > MAX_DIM for v in values):
                raise BadInputError(f"bad shape '{part}'; a dimension over {MAX_DIM} cannot be allocated")
            if name.strip() in shapes:
                raise BadInputError(f"--shape {name.strip()} is given twice; give each input or dimension once")
            shapes[name.strip()] = values if "x" in dims.lower() else values[0]
    return shapes


def resolve_shapes(
    model: ir.Model, shapes: Mapping[str, tuple[int, ...] | int] | None = None, *, strict: bool = True
) -> dict[str, tuple[int, ...]]:
    """The concrete shape of every graph input: ``shapes`` names inputs (``{"input_ids": (2, 64)}``)
    or symbolic dimensions (``{"sequence": 64}``); other symbolic dimensions take a default by name
    (batch 2, sequence 16, past 4). Refuses names that are neither, shapes that do not fit their
    input, and inputs that give one symbolic dimension two sizes."""
    shapes = dict(shapes or {})
    signature = input_signature(model)
    inputs = {info.name: info for info in signature}
    dim_names = sorted({d for info in signature for d in info.shape if isinstance(d, str)})
    for name, value in list(shapes.items()):
        if name in inputs:
            if isinstance(value, int):
                shapes[name] = value = (value,)
            info = inputs[name]
            if len(value) != len(info.shape) or any(isinstance(d, int) and d != s for d, s in zip(info.shape, value)):
                raise BadInputError(f"--shape {name}={'x'.join(map(str, value))} does not fit input '{name}' "
                                    f"{_shape_text(info.shape)}")
        elif name in dim_names:
            if not isinstance(value, int):
                raise BadInputError(f"--shape {name}: '{name}' is a dimension; give one size (e.g. {name}=64)")
        elif not strict:
            del shapes[name]
        else:
            raise BadInputError(f"--shape {name}: the model has no input or dimension named '{name}'; inputs: "
                                f"{', '.join(inputs) or 'none'}; dimensions: {', '.join(dim_names) or 'none'}")
    dims: dict[str, int] = {k: v for k, v in shapes.items() if isinstance(v, int)}
    origin = {k: f"{k}={v}" for k, v in dims.items()}
    for info in signature:  # sizes that whole input shapes give symbolic dimensions must agree
        shape = shapes.get(info.name)
        if not isinstance(shape, tuple):
            continue
        for d, size in zip(info.shape, shape):
            if isinstance(d, str):
                if d in dims and dims[d] != size:
                    raise BadInputError(
                        f"--shape {info.name}={'x'.join(map(str, shape))} gives dimension '{d}' size {size}, but "
                        f"{origin[d]} gives it {dims[d]}; inputs that share a dimension need the same size")
                dims.setdefault(d, size)
                origin.setdefault(d, f"{info.name}={'x'.join(map(str, shape))}")
    resolved: dict[str, tuple[int, ...]] = {}
    for info in signature:
        if isinstance(shapes.get(info.name), tuple):
            resolved[info.name] = shapes[info.name]
            continue
        shape_list = []
        for i, d in enumerate(info.shape):
            if isinstance(d, int):
                shape_list.append(d)
                continue
            key = d if d is not None else f"{info.name}:{i}"
            if key not in dims:
                lowered = key.lower()
                dims[key] = next((size for frag, size in DEFAULT_DIMS if frag in lowered), FALLBACK_DIM)
            shape_list.append(dims[key])
        resolved[info.name] = tuple(shape_list)
    return resolved


def _shape_text(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def feed_bytes(model: ir.Model, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Bytes the inputs of these shapes take (Python ints: no overflow)."""
    sizes = {info.name: np.dtype(info.dtype).itemsize for info in input_signature(model)}
    total = 0
    for name, shape in shapes.items():
        count = 1
        for d in shape:
            count *= int(d)
        total += count * sizes.get(name, 8)
    return total


def generate_inputs(
    model: ir.Model,
    shapes: Mapping[str, tuple[int, ...] | int] | None = None,
    *,
    seed: int = 0,
    strict: bool = False,
) -> dict[str, np.ndarray]:
    """Inputs that match the graph's signature, with values a Transformer accepts.

    Symbolic dimensions take a size from ``shapes`` (``{"sequence": 32}``), otherwise a
    default by name (batch 2, sequence 16, past 4); see :func:`resolve_shapes` for what is
    refused (names the model lacks only with ``strict``). Integer inputs that index an embedding table stay inside it; inputs named like
    masks are 1 with some trailing padding in every batch row after the first, so padding
    paths are exercised.
    """
    rng = np.random.default_rng(seed)
    values = {v.name: v for v in model.graph.inputs}
    resolved = resolve_shapes(model, shapes, strict=strict)
    return {info.name: _values_for(info, resolved[info.name], values[info.name], rng) for info in input_signature(model)}


def _values_for(info: InputInfo, shape: tuple[int, ...], value: ir.Value, rng: np.random.Generator) -> np.ndarray:
    dtype = info.dtype
    lowered = info.name.lower()
    if dtype == np.bool_:
        if "mask" in lowered:
            return _padding_mask(shape).astype(np.bool_)
        return np.ones(shape, dtype=np.bool_)
    if np.issubdtype(dtype, np.integer):
        if "mask" in lowered:
            return _padding_mask(shape).astype(dtype)
        bound = _gather_index_bound(value)
        if "position" in lowered and len(shape) >= 1:
            return np.broadcast_to(np.arange(shape[-1]) % (bound or shape[-1] or 1), shape).astype(dtype)
        high = bound if bound is not None else 2
        return rng.integers(0, max(high, 1), size=shape).astype(dtype)
    if np.issubdtype(dtype, np.floating) or dtype.kind == "V":
        data = rng.standard_normal(shape).astype(np.float32)
        if "mask" in lowered:
            data = _padding_mask(shape).astype(np.float32)
        return data.astype(dtype)
    raise BadInputError(f"cannot generate values for input '{info.name}' of type {dtype}; pass inputs explicitly")


def _padding_mask(shape: tuple[int, ...]) -> np.ndarray:
    mask = np.ones(shape, dtype=np.int64)
    if len(shape) >= 2 and shape[-1] > 1:
        for b in range(1, shape[0]):
            keep = max(1, shape[-1] - (b * shape[-1]) // (2 * shape[0]) - 1)
            mask[b, ..., keep:] = 0
    return mask


def load_inputs(path: os.PathLike | str, model: ir.Model) -> dict[str, np.ndarray]:
    """Feeds from an ``.npz`` file whose keys are the graph's input names."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: inputs file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            feeds = {k: data[k] for k in data.files}
    except Exception as e:
        raise BadInputError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    return check_feeds(feeds, model)


def check_feeds(feeds: Mapping[str, Any], model: ir.Model) -> dict[str, np.ndarray]:
    expected = {info.name: info for info in input_signature(model)}
    missing = sorted(set(expected) - set(feeds))
    extra = sorted(set(feeds) - set(expected))
    if missing or extra:
        raise BadInputError(f"inputs do not match the graph: missing {missing}, unexpected {extra}")
    out = {}
    for name, info in expected.items():
        array = np.asarray(feeds[name])
        if array.dtype != info.dtype:
            raise BadInputError(f"input '{name}' has dtype {array.dtype}, the graph expects {info.dtype}")
        if array.ndim != len(info.shape) or any(isinstance(d, int) and d != s for d, s in zip(info.shape, array.shape)):
            raise BadInputError(f"input '{name}' has shape {list(array.shape)}, the graph expects {list(info.shape)}")
        out[name] = array
    return out


def make_session(model: ir.Model | str | bytes, *, providers: Sequence[Any] = ("CPUExecutionProvider",), options: Mapping[str, Any] | None = None):
    """A session through the one session factory (:func:`tfgraph.deploy.runtime.session`); ``providers`` by name."""
    from tfgraph.providers import Provider
    from tfgraph.deploy.runtime import session

    return session(model, [p if isinstance(p, Provider) else Provider(p) for p in providers], options=options)


# Graph optimizations off, so the graph itself is tested; no pre-packing of MatMul weights either (a
# copy of every weight in the kernels' layout, per session: 0.35 GB and most of the session's build
# time for BERT-base). The arithmetic is the same for float MatMuls; MatMulNBits with accuracy level 4
# computes with int8-quantized activations only when prepacked (the final check tells the two apart).
UNOPTIMIZED = {"graph_optimization_level": "ORT_DISABLE_ALL", "config_entries": {"session.disable_prepacking": "1"}}


def run(model: ir.Model, feeds: Mapping[str, np.ndarray], *, providers=("CPUExecutionProvider",), options=UNOPTIMIZED) -> dict[str, np.ndarray]:
    """Run ``model`` on onnxruntime; by default with graph optimizations off, so the graph itself is tested."""
    session = make_session(model, providers=providers, options=options)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))


@dataclasses.dataclass
class OutputDiff:
    name: str
    max_abs: float
    max_rel: float
    ok: bool
    reason: str = ""
    padded_max_abs: float | None = None  # at padded positions, which are not compared
    # ‖actual − expected‖ / ‖expected‖ over the compared positions (None: not finite, or not a float output)
    relative_rms: float | None = None

    def to_json(self) -> dict:
        d = {"max_abs": self.max_abs, "max_rel": self.max_rel, "ok": self.ok}
        if self.reason:
            d["reason"] = self.reason
        if self.padded_max_abs is not None:
            d["padded_max_abs"] = self.padded_max_abs
        return d


def padded_positions(feeds: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """(batch, sequence) positions that are padding in every 2-D mask-like input (zeros), or None."""
    padded = None
    for name, value in feeds.items():
        value = np.asarray(value)
        if "mask" in name.lower() and value.ndim == 2 and (value.dtype == np.bool_ or np.issubdtype(value.dtype, np.number)):
            here = value == 0
            padded = here if padded is None else (padded & here if padded.shape == here.shape else padded)
    return padded if padded is not None and padded.any() else None


def compare(
    expected: Mapping[str, np.ndarray],
    actual: Mapping[str, np.ndarray],
    *,
    atol: float,
    rtol: float,
    padded: np.ndarray | None = None,
) -> list[OutputDiff]:
    """Element-wise ``|a - e| <= atol·L + rtol·|e|`` per output, ``L`` the output's root mean square when
    above 1 (else 1); NaN must match NaN, shapes must match. ``L``: float32 reassociation noise (a fused
    kernel's summation order) grows with the values' scale and the depth; the logits of a 30-layer real
    decoder (SmolLM2-135M, RMS ~3) differ by 2.3e-4 after attention fusion, one element at |e| ~ 1.3,
    which a bare ``atol`` of 1e-4 would call broken.

    ``padded`` ((batch, sequence) booleans, see :func:`padded_positions`): in outputs that
    start with those two axes, and in KV caches (batch, heads, sequence, head size), the padded
    positions are left out of the check and their largest difference is reported separately
    (a cache entry at a padded position is never attended to). A padded query position that sees no
    key at all has no defined value: exporters disagree (0 behind a NaN guard, or the
    mean over every key), and so do fused kernels.
    """
    diffs = []
    for name, e in expected.items():
        if name not in actual:
            diffs.append(OutputDiff(name, float("inf"), float("inf"), False, "output missing"))
            continue
        a = np.asarray(actual[name])
        e = np.asarray(e)
        if a.shape != e.shape:
            diffs.append(OutputDiff(name, float("inf"), float("inf"), False, f"shape {list(a.shape)} != {list(e.shape)}"))
            continue
        if e.dtype == np.bool_ or np.issubdtype(e.dtype, np.integer):
            mismatch = int(np.count_nonzero(a != e))
            err = float(np.max(np.abs(a.astype(np.float64) - e.astype(np.float64)))) if a.size else 0.0
            diffs.append(OutputDiff(name, err, err, mismatch == 0, f"{mismatch} elements differ" if mismatch else ""))
            continue
        a64 = a.astype(np.float64)
        e64 = e.astype(np.float64)
        padded_max = None
        compared = e64
        where = None
        if padded is not None and e64.ndim >= 2 and e64.shape[:2] == padded.shape:
            where = np.broadcast_to(padded.reshape(padded.shape + (1,) * (e64.ndim - 2)), e64.shape)
        elif padded is not None and e64.ndim == 4 and (e64.shape[0], e64.shape[2]) == padded.shape:
            # a KV cache (batch, heads, positions, head size): what sits at a padded position is never read
            where = np.broadcast_to(padded[:, None, :, None], e64.shape)
        if where is not None:
            compared = e64[~where]
            gap = np.abs(a64[where] - e64[where])
            padded_max = float(np.nanmax(gap)) if gap.size and not np.isnan(gap).all() else 0.0
            a64 = np.where(where, e64, a64)
        nan_mismatch = np.isnan(a64) != np.isnan(e64)
        both_nan = np.isnan(a64) & np.isnan(e64)
        same_inf = np.isinf(e64) & (a64 == e64)
        diff = np.where(both_nan | same_inf, 0.0, np.abs(a64 - e64))
        diff = np.where(nan_mismatch, np.inf, diff)
        scale = np.where(both_nan | same_inf, 1.0, np.abs(e64))
        max_abs = float(diff.max()) if diff.size else 0.0
        max_rel = float((diff / np.maximum(scale, 1e-12)).max()) if diff.size else 0.0
        finite = e64[np.isfinite(e64)]
        level = max(1.0, float(np.sqrt(np.mean(finite * finite)))) if finite.size else 1.0
        ok = bool(np.all(diff <= atol * level + rtol * np.nan_to_num(scale, posinf=0.0)))
        reason = "" if ok else ("NaN where the reference has a number" if nan_mismatch.any() else "")
        relative = None
        if np.isfinite(a64).all() and np.isfinite(e64).all():  # padded positions of a64 hold e64's values
            norm = float(np.linalg.norm(compared))
            gap = float(np.linalg.norm(a64 - e64))
            relative = gap / norm if norm else gap
        diffs.append(OutputDiff(name, max_abs, max_rel, ok, reason, padded_max, relative))
    return diffs


def unoptimized(options: Mapping[str, Any]) -> dict:
    """``options`` with onnxruntime's graph optimizations off and nothing else changed: the deployed kernels
    (prepacked, as the target runs them) on the graph as compiled. A final check that diverges reruns
    with them to tell a broken optimization from the kernels' own arithmetic."""
    return {**options, "graph_optimization_level": "ORT_DISABLE_ALL"}


#: The largest ‖deployed − reference‖ / ‖reference‖ (``OutputDiff.relative_rms``) accepted as the deployed
#: kernels' own arithmetic; a broken kernel is off by the output's whole size (≥ 1). MatMulNBits' int8
#: compute against its float path on SmolLM2-135M's logits for the compile's random token ids: 0.035
#: (round-to-nearest, blocks of 128), 0.26 (GPTQ, blocks of 32; on real sentences both paths give the same
#: next-token agreement with fp32, 0.67 and 0.68).
KERNEL_NUMERICS_LIMIT = 0.5


def within_kernel_numerics(diffs: Sequence[OutputDiff]) -> bool:
    """Every output within :data:`KERNEL_NUMERICS_LIMIT` of the reference (see :func:`unoptimized`)."""
    return all(d.relative_rms is not None and d.relative_rms <= KERNEL_NUMERICS_LIMIT for d in diffs)
