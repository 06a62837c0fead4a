"""Request parsing and limits for :mod:`tfgraph.deploy.serve`: everything a hostile request can reach before the model runs.

Every check here runs before the request's arrays are allocated, so a request over a limit costs
the server no more memory than its (bounded) body:

* JSON: nesting depth is counted on the raw bytes (brackets outside strings) before ``json.loads``,
  so a deeply nested body cannot exhaust the parser's recursion; the nested lists' lengths are
  checked against the element, batch and sequence limits before ``numpy.asarray``.
* ``.npz``: the zip's members are listed and each ``.npy`` header (shape, dtype) is read before any
  array data is: members over the element limit (a "zip bomb" decompresses only as far as its
  header), object (pickled) arrays and members whose size disagrees with their header are refused.
* Masks: an integer (or boolean) input whose name contains ``mask`` (``attention_mask``,
  ``input_mask``, ``encoder_attention_mask``...) is taken to be a 0/1 mask — a name heuristic, since
  a graph does not say which inputs are masks — and values other than 0 and 1 are refused (they
  pass the dtype check but turn the model's softmax into NaN/Inf).
* Sequence length: the model's position table (a Gather on a constant ``[P, H]`` table whose
  indices are computed in the graph from the sequence length — a Range or a slice of a constant
  ``position_ids`` buffer — or whose table is named like ``position``) bounds axis 1 of the integer
  rank-2 inputs (ids, masks, token types); a longer request gets a 422 that says the limit.

Outputs: JSON cannot hold NaN or ±Infinity, so non-finite output values are written as ``null``
(see :func:`json_outputs`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import zipfile
from typing import Any

import numpy as np

NPZ = "application/x-npz"
#: Deepest JSON nesting accepted: {"inputs": {name: [[...]]}} needs 2 + the input's rank.
MAX_JSON_DEPTH = 64
#: How non-finite output values appear in JSON answers.
NON_FINITE_JSON = "null"


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    shape: list  # int, symbolic name (str) or None
    bound: int | None  # exclusive upper bound of integer values (embedding rows), if known
    mask: bool = False  # values must be 0 or 1 (an integer input named like a mask)
    seq_limit: int | None = None  # largest size of axis 1 (the model's position table), if known


def is_mask(name: str, dtype: np.dtype) -> bool:
    """The name heuristic: an integer or boolean input whose name contains ``mask``."""
    return (np.issubdtype(dtype, np.integer) or dtype.kind == "b") and "mask" in name.lower()


def sequence_axis(spec: InputSpec) -> bool:
    """Whether axis 1 of this input runs along the sequence: an integer rank-2 input with a free axis 1."""
    return np.issubdtype(spec.dtype, np.integer) and len(spec.shape) == 2 and not isinstance(spec.shape[1], int)


# --- JSON -----------------------------------------------------------------------------------------

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[{]}")


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """Whether the JSON text nests deeper than ``limit``: brackets outside strings, counted without parsing."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    brackets = _STRING.sub(b'""', body).translate(None, _NOT_BRACKETS).translate(_BRACKETS)
    steps = np.frombuffer(brackets, np.int8)
    depth = 0
    for start in range(0, len(steps), 1 << 20):
        running = np.cumsum(steps[start:start + (1 << 20)], dtype=np.int64) + depth
        if running.size and int(running.max()) > limit:
            return True
        depth = int(running[-1]) if running.size else depth
    return False


def parse_json(body: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    if json_depth_exceeds(body, max_depth):
        raise RequestError(422, f"JSON nests deeper than {max_depth} levels, the limit")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError; so is a 5,000-digit int
        raise RequestError(400, f"body is not valid JSON ({' '.join(str(e).split())[:200]})") from None


def nested_shape(raw: Any, rank: int) -> list[int]:
    """The lengths of ``raw``'s nested lists along their first elements, up to ``rank + 1`` levels."""
    shape: list[int] = []
    while isinstance(raw, list) and len(shape) <= rank:
        shape.append(len(raw))
        if not raw:
            break
        if len(shape) == 1 and rank >= 2 and all(isinstance(r, list) for r in raw) and len({len(r) for r in raw}) > 1:
            raise RequestError(422, "ragged")
        raw = raw[0]
    return shape


def check_shape(spec: InputSpec, shape: list[int] | tuple, *, max_batch: int, max_elements: int) -> None:
    """Limits that depend on the shape alone, before the array exists."""
    shape = [int(d) for d in shape]
    if len(shape) != len(spec.shape):
        raise RequestError(422, f"input '{spec.name}' has rank {len(shape)} (shape {shape}), the model expects {spec.shape}")
    elements = math.prod(shape)
    if elements > max_elements:
        raise RequestError(413, f"input '{spec.name}' has {elements} elements, the limit is {max_elements}")
    if shape and shape[0] > max_batch:
        raise RequestError(413, f"input '{spec.name}' has batch {shape[0]}, the limit is {max_batch}")
    if spec.seq_limit is not None and sequence_axis(spec) and shape[1] > spec.seq_limit:
        raise RequestError(422, f"input '{spec.name}' has sequence length {shape[1]}, over the model's limit of "
                                f"{spec.seq_limit} (its position table)")


# --- .npz -----------------------------------------------------------------------------------------

def read_npz(body: bytes, specs: list[InputSpec], *, max_batch: int, max_elements: int) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` body, each ``.npy`` header checked before its data is read."""
    from numpy.lib import format as npy

    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
        members = archive.infolist()
    except Exception as e:
        raise RequestError(400, f"body is not a readable .npz file ({type(e).__name__})") from None
    by_name = {s.name: s for s in specs}
    names = [m.filename[:-4] if m.filename.endswith(".npy") else m.filename for m in members]
    if len(names) != len(set(names)) or set(names) != set(by_name):
        raise RequestError(422, f"inputs do not match the model: missing {sorted(set(by_name) - set(names))}, "
                                f"unexpected {sorted(set(names) - set(by_name))[:8]}")
    arrays = {}
    for member, name in zip(members, names):
        spec = by_name[name]
        if member.file_size > max_elements * 16 + 4096:  # larger than any array under the limit
            raise RequestError(413, f"input '{name}' is {member.file_size} bytes uncompressed, more than an array of "
                                    f"{max_elements} elements (the limit) can be")
        try:
            with archive.open(member) as f:
                version = npy.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = npy.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = npy.read_array_header_2_0(f)
                else:
                    raise RequestError(400, f"input '{name}': .npy format version {version} is not supported")
                if dtype.hasobject:
                    raise RequestError(422, f"input '{name}' is an object (pickled) array; send numbers")
                if dtype != spec.dtype:
                    raise RequestError(422, f"input '{name}' has dtype {dtype}, the model expects {spec.dtype}")
                check_shape(spec, shape, max_batch=max_batch, max_elements=max_elements)
                size = math.prod(shape) * dtype.itemsize
                if member.file_size != f.tell() + size:
                    raise RequestError(400, f"input '{name}': {member.file_size} bytes, its .npy header says {f.tell() + size}")
                data = bytearray(size)
                if f.readinto(data) != size:
                    raise RequestError(400, f"input '{name}': the .npy data is truncated")
        except RequestError:
            raise
        except Exception as e:
            raise RequestError(400, f"input '{name}' is not a readable .npy member ({type(e).__name__})") from None
        arrays[name] = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
    return arrays


# --- validation -----------------------------------------------------------------------------------

def _to_array(spec: InputSpec, raw: Any, *, max_batch: int, max_elements: int) -> np.ndarray:
    """A JSON value as an array of the spec's dtype; its shape is checked before it is converted."""
    try:
        shape = nested_shape(raw, len(spec.shape))
    except RequestError:
        raise RequestError(422, f"input '{spec.name}' is not a rectangular array") from None
    if math.prod(shape) > max_elements:
        raise RequestError(413, f"input '{spec.name}' has {math.prod(shape)} elements, the limit is {max_elements}")
    if len(shape) > len(spec.shape):
        raise RequestError(422, f"input '{spec.name}' has rank over {len(spec.shape)}, the model expects {spec.shape}")
    if len(shape) == len(spec.shape) and all(shape):
        check_shape(spec, shape, max_batch=max_batch, max_elements=max_elements)
    try:
        array = np.asarray(raw)
    except Exception:
        raise RequestError(422, f"input '{spec.name}' is not a rectangular array") from None
    if array.dtype == object or array.dtype.kind in "USOV":
        raise RequestError(422, f"input '{spec.name}' is not a rectangular array of numbers")
    if array.size and array.dtype.kind == "b" and spec.dtype.kind != "b":
        raise RequestError(422, f"input '{spec.name}' holds booleans, the model expects {spec.dtype}")
    if np.issubdtype(spec.dtype, np.integer) and array.size and array.dtype.kind in "fc":
        raise RequestError(422, f"input '{spec.name}' holds non-integers, the model expects {spec.dtype}")
    if array.size > max_elements:
        raise RequestError(413, f"input '{spec.name}' has {array.size} elements, the limit is {max_elements}")
    try:
        with np.errstate(all="raise"):
            converted = array.astype(spec.dtype)
    except (OverflowError, FloatingPointError, ValueError, TypeError):
        raise RequestError(422, f"input '{spec.name}' does not fit {spec.dtype}") from None
    if np.issubdtype(spec.dtype, np.integer) and array.size and not np.array_equal(converted, array):
        raise RequestError(422, f"input '{spec.name}' does not fit {spec.dtype}")
    return converted


def validate(feeds: dict[str, Any], specs: list[InputSpec], *, max_batch: int, max_elements: int) -> dict[str, np.ndarray]:
    """Arrays of the signature's dtypes, or RequestError(4xx) saying what is wrong."""
    names = {s.name for s in specs}
    if not isinstance(feeds, dict):
        raise RequestError(400, "'inputs' must be an object mapping input names to arrays")
    missing = sorted(names - set(feeds))
    extra = sorted(set(feeds) - names)
    if missing or extra:
        raise RequestError(422, f"inputs do not match the model: missing {missing}, unexpected {extra[:8]}")
    out: dict[str, np.ndarray] = {}
    dims: dict[str, int] = {}
    for spec in specs:
        raw = feeds[spec.name]
        if isinstance(raw, np.ndarray):
            array = raw
            if array.dtype != spec.dtype:
                raise RequestError(422, f"input '{spec.name}' has dtype {array.dtype}, the model expects {spec.dtype}")
        else:
            array = _to_array(spec, raw, max_batch=max_batch, max_elements=max_elements)
        check_shape(spec, array.shape, max_batch=max_batch, max_elements=max_elements)
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
            if isinstance(want, int) and want != got:
                raise RequestError(422, f"input '{spec.name}' dimension {axis} is {got}, the model expects {want}")
            if isinstance(want, str):
                if dims.setdefault(want, got) != got:
                    raise RequestError(422, f"input '{spec.name}' dimension {axis} ('{want}') is {got}, another input has {dims[want]}")
            if got == 0:
                raise RequestError(422, f"input '{spec.name}' has an empty dimension {axis}")
        if spec.bound is not None and array.size and (array.min() < 0 or array.max() >= spec.bound):
            raise RequestError(422, f"input '{spec.name}' has values outside [0, {spec.bound})")
        if spec.mask and array.size and spec.dtype.kind != "b":
            bad = array[(array != 0) & (array != 1)]
            if bad.size:
                raise RequestError(422, f"input '{spec.name}' is an attention mask and must hold only 0 and 1 (it holds {bad.flat[0]})")
        if spec.dtype.kind == "f" and array.size and not np.all(np.isfinite(array)):
            raise RequestError(422, f"input '{spec.name}' has non-finite values")
        out[spec.name] = np.ascontiguousarray(array)
    return out


def json_outputs(outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Nested lists for a JSON answer; NaN and ±Infinity (which JSON cannot hold) become ``null``."""
    result = {}
    for name, value in outputs.items():
        value = np.asarray(value)
        if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            boxed = value.astype(object)
            boxed[~np.isfinite(value)] = None
            result[name] = boxed.tolist()
        else:
            result[name] = value.tolist()
    return result


# --- HTTP read timeouts ---------------------------------------------------------------------------

def header_timeout_protocol(timeout_s: float):
    """uvicorn's h11 protocol, closing connections whose request headers do not arrive within ``timeout_s``.

    uvicorn's ``timeout_keep_alive`` only runs between requests; a client that connects and sends
    nothing, or half a request line, holds the connection forever. This arms a timer while the
    connection waits for a request's headers (from the connection's start and from the first byte
    of each next request) and answers 408 and closes when it fires. Bodies have their own deadline
    in the handler.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:
                self._arm()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                body = json.dumps({"error": f"request headers not received within {timeout_s:g} s"}).encode()
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                self.transport.close()

    return HeaderTimeoutProtocol
