"""Calibration: where its inputs come from, and streamed per-tensor range statistics.

Inputs come from an ``.npz`` of feeds, a text file of sentences (one per line, tokenized with
the model's local tokenizer), or, with a warning, from the input signature. The statistics are
streamed: each batch's activations are folded into a per-tensor accumulator (min/max, or a
histogram that grows its range) and dropped, so memory is bounded by the number of tensors
times the histogram size, not by the calibration set.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from tfgraph.errors import BadInputError

Progress = Callable[[str, int, int], None]
GENERATED_WARNING = "calibration on generated inputs: ranges from random token ids are a poor guide; pass real data"


# --- calibrators ------------------------------------------------------------------------------


class MinMax:
    """Range = the smallest and largest value seen."""

    name = "minmax"

    def __init__(self) -> None:
        self.lo = np.inf
        self.hi = -np.inf

    def update(self, x: np.ndarray) -> None:
        if x.size:
            self.lo = min(self.lo, float(np.min(x)))
            self.hi = max(self.hi, float(np.max(x)))

    def range(self) -> tuple[float, float]:
        if self.lo > self.hi:
            return 0.0, 0.0
        return self.lo, self.hi


class _Histogram(MinMax):
    """A histogram of the values over a range that widens when a batch falls outside it: the old
    counts are re-binned into the wider grid (each old bin's count goes to the new bin holding its
    centre; the grid only ever widens by whole multiples, so bins nest exactly)."""

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        self.bins = bins
        self.counts: np.ndarray | None = None
        self.edge = 0.0  # histogram covers [-edge, edge]

    def update(self, x: np.ndarray) -> None:
        if not x.size:
            return
        super().update(x)
        x = np.asarray(x, dtype=np.float64).ravel()
        x = x[np.isfinite(x)]
        if not x.size:
            return
        need = float(np.max(np.abs(x)))
        if self.counts is None:
            self.edge = need if need > 0 else 1e-12
            self.counts = np.zeros(self.bins, dtype=np.int64)
        elif need > self.edge:
            factor = 1
            while self.edge * factor < need:
                factor *= 2
            # Old bin i of width w covers a 1/factor part of new bin j: centre-based re-binning.
            old = self.counts
            centres = (np.arange(self.bins) + 0.5) / self.bins * 2 - 1  # in [-1, 1] of the old range
            new_index = np.clip(((centres / factor + 1) / 2 * self.bins).astype(np.int64), 0, self.bins - 1)
            self.counts = np.bincount(new_index, weights=old, minlength=self.bins).astype(np.int64)
            self.edge *= factor
        hist, _ = np.histogram(x, bins=self.bins, range=(-self.edge, self.edge))
        self.counts += hist

    def edges(self) -> np.ndarray:
        return np.linspace(-self.edge, self.edge, self.bins + 1)


class Percentile(_Histogram):
    """Range = the ``percentile``-th and ``100 - percentile``-th percentiles of the values
    (to one histogram bin)."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(bins)
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        if self.counts is None:
            return 0.0, 0.0
        cdf = np.cumsum(self.counts) / self.counts.sum()
        edges = self.edges()
        lo_q = (100.0 - self.percentile) / 100.0
        hi_q = self.percentile / 100.0
        lo = edges[int(np.searchsorted(cdf, lo_q, side="left"))]
        hi = edges[int(np.searchsorted(cdf, hi_q, side="left")) + 1]
        return max(float(lo), self.lo), min(float(hi), self.hi)


def kl_threshold(counts: np.ndarray, quant_levels: int = 128) -> int:
    """The number of histogram bins ``i`` (from the start of ``counts``, a histogram of |x|) whose
    clipped distribution, quantized to ``quant_levels`` levels, has the least KL divergence from the
    original. The clipped mass goes into the last kept bin."""
    counts = counts.astype(np.float64)
    n = len(counts)
    best, best_i = np.inf, n
    for i in range(quant_levels, n + 1):
        p = counts[:i].copy()
        p[-1] += counts[i:].sum()
        nonzero = p > 0
        # Merge the i bins into quant_levels groups, spread each group's mass over its non-empty bins.
        group = (np.arange(i) * quant_levels) // i
        sums = np.bincount(group, weights=counts[:i], minlength=quant_levels)
        sizes = np.bincount(group, weights=nonzero.astype(np.float64), minlength=quant_levels)
        q = np.where(nonzero, sums[group] / np.maximum(sizes[group], 1), 0.0)
        if p.sum() == 0 or q.sum() == 0:
            continue
        p_n = p / p.sum()
        q_n = q / q.sum()
        mask = p_n > 0
        q_safe = np.where(q_n[mask] > 0, q_n[mask], 1e-12)
        kl = float(np.sum(p_n[mask] * np.log(p_n[mask] / q_safe)))
        if kl < best:
            best, best_i = kl, i
    return best_i


class Entropy(_Histogram):
    """Symmetric range ``[-t, t]`` with ``t`` the |x| threshold of least KL divergence between the
    clipped and the quantized distribution (the TensorRT-style entropy calibration)."""

    name = "entropy"

    def __init__(self, bins: int = 2048, quant_levels: int = 128) -> None:
        super().__init__(bins)
        self.quant_levels = quant_levels

    def range(self) -> tuple[float, float]:
        if self.counts is None:
            return 0.0, 0.0
        half = self.bins // 2
        absolute = self.counts[half:][::1] + self.counts[:half][::-1]  # |x| histogram over [0, edge]
        i = kl_threshold(absolute, self.quant_levels)
        t = i / half * self.edge
        return max(-t, self.lo), min(t, self.hi)


CALIBRATORS = {"minmax": MinMax, "percentile": Percentile, "entropy": Entropy}


def make_calibrator(name: str):
    try:
        return CALIBRATORS[name]()
    except KeyError:
        raise BadInputError(f"unknown calibrator '{name}'; valid: {', '.join(CALIBRATORS)}") from None


# --- calibration data --------------------------------------------------------------------------


class CalibrationSet:
    """Batches of feeds plus where they came from and their hash (for the manifest)."""

    def __init__(self, batches: list[dict[str, np.ndarray]], source: str):
        if not batches:
            raise BadInputError("the calibration set is empty")
        self.batches = batches
        self.source = source

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for batch in self.batches:
            for name in sorted(batch):
                array = np.ascontiguousarray(batch[name])
                digest.update(name.encode())
                digest.update(str(array.dtype).encode())
                digest.update(str(array.shape).encode())
                digest.update(array.tobytes())
        return digest.hexdigest()

    def merged(self) -> dict[str, np.ndarray]:
        """All batches as one feed (batches of equal non-batch shape only)."""
        if len(self.batches) == 1:
            return dict(self.batches[0])
        return {k: np.concatenate([b[k] for b in self.batches]) for k in self.batches[0]}

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "sha256": self.sha256,
            "batches": len(self.batches),
            "samples": int(sum(len(next(iter(b.values()))) for b in self.batches)),
        }


def fit_static(calibration: CalibrationSet, model: ir.Model) -> CalibrationSet:
    """Re-cut ``calibration`` for a model whose inputs have fully static shapes (an NPU target's
    pinned graph): rows regrouped into batches of the pinned batch size, and every other axis
    zero-padded or truncated to the pinned size (tokenized sentences are padded to the longest of
    their batch; a zero is the padding token, a masked position and segment 0). Rows that do not
    fill the last batch are dropped."""
    shapes = {v.name: list(v.shape) for v in model.graph.inputs if v.shape is not None}
    if not shapes or any(not isinstance(d, int) for dims in shapes.values() for d in dims):
        return calibration
    names = [n for n in shapes if n in calibration.batches[0]]
    if not names:
        return calibration
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in calibration.batches:
        for name in names:
            array, want = np.asarray(batch[name]), shapes[name]
            if array.ndim != len(want):
                raise BadInputError(f"calibration input '{name}' has rank {array.ndim}, the pinned input {want}")
            for axis, size in enumerate(want[1:], start=1):
                if array.shape[axis] > size:
                    array = np.take(array, range(size), axis=axis)
                elif array.shape[axis] < size:
                    pad = [(0, 0)] * array.ndim
                    pad[axis] = (0, size - array.shape[axis])
                    array = np.pad(array, pad)
            rows[name].extend(array)
    batch_size = shapes[names[0]][0] if shapes[names[0]] else 1
    count = len(rows[names[0]]) // max(batch_size, 1) * batch_size
    if count == 0:
        raise BadInputError(f"the calibration set has fewer rows ({len(rows[names[0]])}) than the pinned batch {batch_size}")
    batches = [{n: np.stack(rows[n][i : i + batch_size]) for n in names} for i in range(0, count, batch_size)]
    return CalibrationSet(batches, f"{calibration.source} (fitted to the pinned input shapes)")


def _split(feeds: Mapping[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(feeds.values())))
    return [{k: v[i : i + batch_size] for k, v in feeds.items()} for i in range(0, n, batch_size)]


def tokenize(sentences: Sequence[str], tokenizer_dir: str | os.PathLike, input_names: Iterable[str]) -> dict[str, np.ndarray]:
    """Tokenize ``sentences`` with the tokenizer saved in ``tokenizer_dir`` (local files only)."""
    tokens = _fast_tokenize(sentences, tokenizer_dir)
    if tokens is None:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        tokens = tokenizer(list(sentences), padding=True, truncation=True, return_tensors="np")
    names = set(input_names)
    return {k: np.asarray(v).astype(np.int64) for k, v in tokens.items() if k in names}


def _fast_tokenize(sentences: Sequence[str], tokenizer_dir: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """The folder's ``tokenizer.json`` run by the ``tokenizers`` library directly, padded to the longest
    sentence and truncated to ``model_max_length`` as ``AutoTokenizer(..., padding=True, truncation=True)``
    does with it: the same Rust tokenizer, without importing transformers (and torch with it: 5-10 s and
    0.25 GB of a compile, issue 20). None where the folder needs transformers (no tokenizer.json, no
    pad token, left padding, added tokens in the config): the caller then uses transformers."""
    import json

    folder = pathlib.Path(tokenizer_dir)
    try:
        import tokenizers

        config = json.loads((folder / "tokenizer_config.json").read_text())
        tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:  # noqa: BLE001 - no tokenizers package, no or unreadable files: transformers decides
        return None
    pad = config.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if (not isinstance(pad, str) or tokenizer.token_to_id(pad) is None or config.get("padding_side", "right") != "right"
            or config.get("added_tokens_decoder") or config.get("additional_special_tokens")):
        return None
    limit = config.get("model_max_length")
    tokenizer.no_truncation()
    if isinstance(limit, int) and 0 < limit < 10**6:
        tokenizer.enable_truncation(limit)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad), pad_token=pad,
                             pad_type_id=int(config.get("pad_token_type_id", 0)))
    encoded = tokenizer.encode_batch(list(sentences))
    return {"input_ids": np.array([e.ids for e in encoded], np.int64),
            "token_type_ids": np.array([e.type_ids for e in encoded], np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], np.int64)}


def _empty_cache(feeds: dict[str, np.ndarray], model: ir.Model) -> dict[str, np.ndarray]:
    """Sentences for a KV-cached decoder (``--task text-generation``) are prompts: its past key/value
    inputs (batch, kv_heads, past, head_size) get past length 0."""
    batch = next(iter(feeds.values())).shape[0] if feeds else 0
    for value in model.graph.inputs:
        shape = value.shape
        if (value.name not in feeds and value.name.startswith("past") and shape is not None and len(shape) == 4
                and isinstance(shape[1], int) and isinstance(shape[3], int) and value.dtype is not None):
            feeds[value.name] = np.zeros((batch, shape[1], 0, shape[3]), value.dtype.numpy())
    return feeds


def load_calibration(
    source: str | os.PathLike | Mapping[str, np.ndarray] | CalibrationSet | None,
    model: ir.Model,
    *,
    tokenizer: str | os.PathLike | None = None,
    batch_size: int = 8,
    shapes: Mapping | None = None,
    seed: int = 0,
    static: bool = False,
) -> CalibrationSet:
    """Calibration batches from an ``.npz``, a ``.txt`` of sentences (``tokenizer``: the folder of the
    model's tokenizer), a dict of arrays, or, when ``source`` is None, generated inputs (warns).
    ``static``: the model's inputs are pinned (an NPU target); batches are re-cut to those shapes
    (:func:`fit_static`) before they are checked against the graph."""
    from tfgraph.compiler.verify import check_feeds, generate_inputs, load_inputs

    if isinstance(source, CalibrationSet):
        return source
    if source is None:
        warnings.warn(GENERATED_WARNING, stacklevel=2)
        return CalibrationSet([generate_inputs(model, shapes, seed=seed)], "generated")
    def checked(batches: list[dict[str, np.ndarray]], label: str) -> CalibrationSet:
        calibration = CalibrationSet(batches, label)
        if static:
            calibration = fit_static(calibration, model)
        return CalibrationSet([check_feeds(b, model) for b in calibration.batches], calibration.source)

    if isinstance(source, Mapping):
        return checked(_split(dict(source), batch_size), "in-memory")
    path = pathlib.Path(source)
    if path.suffix == ".npz":
        if static:
            with np.load(path) as data:
                return checked(_split({k: data[k] for k in data.files}, batch_size), str(path))
        return CalibrationSet(_split(load_inputs(path, model), batch_size), str(path))
    if path.suffix in (".txt", ".text"):
        if tokenizer is None:
            raise BadInputError(f"calibration text {path} needs a tokenizer: pass --tokenizer DIR (a folder with "
                                  "tokenizer.json, e.g. the model's Hugging Face folder; tokenizer=... in the API)")
        sentences = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        names = [v.name for v in model.graph.inputs]
        batches = [_empty_cache(tokenize(sentences[i : i + batch_size], tokenizer, names), model)
                   for i in range(0, len(sentences), batch_size)]
        return checked(batches, str(path))
    raise BadInputError(f"calibration data {path}: expected an .npz of feeds or a .txt of sentences")


# --- collection --------------------------------------------------------------------------------


def collect_ranges(
    model: ir.Model,
    tensor_names: Sequence[str],
    calibration: CalibrationSet,
    *,
    calibrator: str = "minmax",
    progress: Progress | None = None,
    chunk: int = 64,
) -> dict[str, tuple[float, float]]:
    """Per tensor, the range ``calibrator`` picks over every batch of ``calibration``.

    The model is run with the tensors as extra outputs, ``chunk`` tensors at a time so that one
    run never holds more than ``chunk`` activations; each batch's arrays are folded into the
    calibrators and dropped."""
    from tfgraph.compiler.verify import UNOPTIMIZED, make_session

    names = list(dict.fromkeys(tensor_names))
    stats = {name: make_calibrator(calibrator) for name in names}
    fed = [name for name in names if name in calibration.batches[0]]
    for batch in calibration.batches:  # graph inputs: straight from the feeds
        for name in fed:
            stats[name].update(np.asarray(batch[name]))
    names = [name for name in names if name not in fed]
    proto = ir.serde.serialize_model(model)
    existing = {o.name for o in proto.graph.output}
    total = len(calibration.batches) * ((len(names) + chunk - 1) // chunk)
    done = 0

    for start in range(0, len(names), chunk):
        part = names[start : start + chunk]
        copy = ir.serde.deserialize_model(proto)
        values = {v.name: v for v in copy.graph.inputs}
        values.update({o.name: o for node in copy.graph for o in node.outputs})
        for name in part:
            if name not in existing:
                copy.graph.outputs.append(values[name])
        session = make_session(copy, options=UNOPTIMIZED)
        for batch in calibration.batches:
            values = session.run(part, batch)
            for name, value in zip(part, values):
                stats[name].update(np.asarray(value))
            del values
            done += 1
            if progress:
                progress("calibrate", done, total)
    return {name: calibrator.range() for name, calibrator in stats.items()}
