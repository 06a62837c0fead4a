"""Loading and saving models: the one place where protobuf meets onnx_ir.

A model is loaded into an :class:`onnx_ir.Model` once, validated on the way in
(readable protobuf, supported IR version and opsets, checker, external data that
stays inside the model's folder), kept as onnx_ir through every pass, and saved
once. Large models (over protobuf's 2 GB limit) keep their weights in an external
data file on both sides.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import pathlib
import tempfile
import weakref
from collections.abc import Iterable, Iterator

import numpy as np

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from tfgraph.errors import BadInputError, first_line

# Protobuf refuses to serialize messages of 2 GiB or more; stay well below it.
PROTOBUF_LIMIT = 2**31 - 1
DEFAULT_EXTERNAL_DATA_THRESHOLD = 1_800_000_000
EXTERNAL_DATA_SUFFIX = ".data"


def _tensor_protos(proto: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every tensor of the model (initializers, tensor attributes, in subgraphs and function
    bodies) with a label for messages: its name, or the node and attribute that hold it."""

    def walk(graph: onnx.GraphProto, where: str) -> Iterator[tuple[str, onnx.TensorProto]]:
        for tensor in graph.initializer:
            yield tensor.name or f"an unnamed initializer of {where}", tensor
        for node in graph.node:
            node_label = f"node '{node.name or node.op_type}'"
            for attr in node.attribute:
                label = f"{node_label} attribute '{attr.name}'"
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t.name or label, attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    for t in attr.tensors:
                        yield t.name or label, t
                elif attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g, f"{label}")
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from walk(g, f"{label}")

    yield from walk(proto.graph, "the main graph")
    for function in proto.functions:
        # Function bodies hold tensors only in Constant nodes; wrap them in a graph to walk them alike.
        yield from walk(onnx.helper.make_graph(function.node, function.name, [], []), f"function '{function.name}'")


def _external_entries(tensor: onnx.TensorProto, label: str, model_path: pathlib.Path) -> dict[str, str]:
    entries: dict[str, str] = {}
    for entry in tensor.external_data:
        entries[entry.key] = entry.value
    if "location" not in entries:
        raise BadInputError(f"{model_path}: tensor '{label}' is marked as external data but names no location")
    return entries


def _needed_bytes(tensor: onnx.TensorProto, label: str, model_path: pathlib.Path) -> int:
    """The bytes a tensor's dims and data type need in raw (external) form."""
    try:
        dtype = ir.DataType(tensor.data_type)
        bits = dtype.bitwidth
    except (ValueError, TypeError, AttributeError):
        raise BadInputError(
            f"{model_path}: external tensor '{label}' has data type {tensor.data_type}, which has no fixed size "
            "in raw form"
        ) from None
    if dtype in (ir.DataType.UNDEFINED, ir.DataType.STRING) or not bits:
        raise BadInputError(
            f"{model_path}: external tensor '{label}' has data type {dtype.name}, which external data cannot hold"
        )
    if any(d < 0 for d in tensor.dims):
        raise BadInputError(f"{model_path}: external tensor '{label}' has a negative dimension {list(tensor.dims)}")
    count = 1
    for d in tensor.dims:
        count *= d
    return (count * bits + 7) // 8


def _int_entry(entries: dict[str, str], key: str, where: str) -> int | None:
    if key not in entries:
        return None
    try:
        value = int(entries[key])
    except ValueError:
        value = -1
    if value < 0:
        raise BadInputError(f"{where} has {key} '{entries[key]}'; expected a byte count >= 0")
    return value


def _check_location(location: str, base: pathlib.Path, model_path: pathlib.Path) -> pathlib.Path:
    pure = pathlib.PurePath(location)
    if pure.is_absolute() or pathlib.PureWindowsPath(location).is_absolute() or ".." in pure.parts:
        raise BadInputError(
            f"{model_path}: external data location '{location}' escapes the model's folder; "
            "only relative paths inside the folder are accepted"
        )
    target = (base / location).resolve()
    if base != target and base not in target.parents:
        raise BadInputError(
            f"{model_path}: external data location '{location}' resolves outside the model's folder ({target})"
        )
    if not target.is_file():
        raise BadInputError(f"{model_path}: external data file '{location}' is missing (looked for {target})")
    return target


def check_external_data(proto: onnx.ModelProto, base_dir: pathlib.Path, model_path: pathlib.Path) -> list[pathlib.Path]:
    """Refuse external data that escapes ``base_dir``, is missing, or does not fit its tensor.

    For every external tensor: ``offset`` and ``length`` (when given) are byte counts,
    ``length`` is exactly what the tensor's dims and data type need, and ``offset`` plus
    those bytes lie inside the file. onnx_ir reads ``offset`` + the needed bytes and
    ignores ``length``; checked here, nothing is read outside the declared extent.

    Returns the external data files the model uses.
    """
    base = base_dir.resolve()
    files: dict[str, pathlib.Path] = {}
    sizes: dict[pathlib.Path, int] = {}
    for label, tensor in _tensor_protos(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = _external_entries(tensor, label, model_path)
        location = entries["location"]
        if location not in files:
            files[location] = _check_location(location, base, model_path)
        target = files[location]
        if target not in sizes:
            sizes[target] = target.stat().st_size
        size = sizes[target]
        needed = _needed_bytes(tensor, label, model_path)
        where = f"{model_path}: external tensor '{label}' in '{location}' ({size} bytes)"
        offset = _int_entry(entries, "offset", where) or 0
        length = _int_entry(entries, "length", where)
        if length is not None and length != needed:
            raise BadInputError(
                f"{where} declares length {length} bytes at offset {offset}, but its dims {list(tensor.dims)} "
                f"and type {ir.DataType(tensor.data_type).name} need {needed} bytes"
            )
        declared = f"declares length {length} bytes" if length is not None else "declares no length"
        if offset > size:
            raise BadInputError(
                f"{where} {declared} at offset {offset}, past the end of the file; it needs {needed} bytes"
            )
        if offset + needed > size:
            raise BadInputError(
                f"{where} {declared} at offset {offset} and needs {needed} bytes: "
                f"bytes {offset}..{offset + needed} run past the end of the file"
            )
    return sorted(set(files.values()))


def _check_versions(proto: onnx.ModelProto, model_path: pathlib.Path) -> None:
    if proto.ir_version > onnx.IR_VERSION:
        raise BadInputError(
            f"{model_path}: IR version {proto.ir_version} is newer than the installed onnx {onnx.__version__} "
            f"reads (up to {onnx.IR_VERSION}); upgrade onnx"
        )
    if proto.ir_version <= 0:
        raise BadInputError(f"{model_path}: not an ONNX model (no IR version)")
    supported = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > supported:
            raise BadInputError(
                f"{model_path}: uses ai.onnx opset {opset.version}, but the installed onnx {onnx.__version__} "
                f"supports opsets up to {supported}; upgrade onnx"
            )
    if not any(op.domain in ("", "ai.onnx") for op in proto.opset_import):
        raise BadInputError(f"{model_path}: imports no ai.onnx opset")


def sha256_file(path: os.PathLike | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class LoadedModel:
    """An onnx_ir model plus where it came from (for the manifest)."""

    def __init__(self, model: ir.Model, path: pathlib.Path, external_files: list[pathlib.Path]):
        self.model = model
        self.path = path
        self.external_files = external_files

    def input_hashes(self) -> dict:
        return {
            "path": str(self.path),
            "sha256": sha256_file(self.path),
            "external_data": {f.name: sha256_file(f) for f in self.external_files},
        }


def load(path: os.PathLike | str) -> LoadedModel:
    """Load and validate an ONNX model file into onnx_ir.

    Raises :class:`BadInputError` with a one-line reason for anything unusable.
    """
    model_path = pathlib.Path(path)
    if not model_path.exists():
        raise BadInputError(f"{model_path}: no such file")
    if model_path.is_dir():
        raise BadInputError(f"{model_path}: is a directory, expected an .onnx file")
    if not model_path.is_file():
        raise BadInputError(f"{model_path}: not a regular file")
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as e:
        raise BadInputError(f"{model_path}: not a readable ONNX protobuf ({type(e).__name__}: {e})") from None
    except Exception as e:  # protobuf raises a variety of internal errors on garbage
        raise BadInputError(f"{model_path}: not a readable ONNX protobuf ({type(e).__name__}: {e})") from None
    if not proto.HasField("graph") and proto.ir_version == 0:
        raise BadInputError(f"{model_path}: not an ONNX model (empty or unrecognised protobuf)")
    _check_versions(proto, model_path)
    external_files = check_external_data(proto, model_path.parent, model_path)
    try:
        if external_files:  # by path: the checker handles models over 2 GB with external data
            onnx.checker.check_model(str(model_path))
        else:  # the proto already read, its large weights left out: no second copy of the model in memory
            _check_without_weights(proto)
    except onnx.checker.ValidationError as e:
        first = first_line(e)
        raise BadInputError(f"{model_path}: fails the ONNX checker: {first}") from None
    except Exception as e:
        raise BadInputError(f"{model_path}: fails the ONNX checker: {type(e).__name__}: {e}") from None
    try:
        # Deserialise the proto we already read; external tensors stay lazy (memory-mapped on use).
        model = ir.serde.deserialize_model(proto)
        ir.external_data.set_base_dir(model.graph, model_path.parent)
        if external_files and model_bytes(model) < DEFAULT_EXTERNAL_DATA_THRESHOLD:
            # Small enough for one protobuf: hold the weights in memory, so every later
            # serialization (verification sessions) is self-contained.
            model = ir.external_data.load_to_model(model)
        hold_weights(model)
    except Exception as e:
        raise BadInputError(f"{model_path}: cannot be converted to onnx_ir: {type(e).__name__}: {e}") from None
    return LoadedModel(model, model_path, external_files)


_GRAPH = ir.AttributeType.GRAPH
_GRAPHS = ir.AttributeType.GRAPHS
_TENSOR = ir.AttributeType.TENSOR
_TENSORS = ir.AttributeType.TENSORS


def graphs(model: ir.Model) -> list[ir.Graph]:
    """The main graph and every subgraph (what ``model.graphs()`` yields, breadth first).

    A plain walk over the nodes' attributes: onnx_ir's recursive iterator costs several
    microseconds a node, and the pass manager's instruments walk the model several times per
    pass (node and parameter counts, fingerprints).
    """
    found = [model.graph]
    for graph in found:  # grows while walked
        for node in graph:
            if node.attributes:
                for attr in node.attributes.values():
                    if attr.type == _GRAPH:
                        found.append(attr.value)
                    elif attr.type == _GRAPHS:
                        found.extend(attr.value)
    return found


def iter_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every constant tensor of the model: initializers and tensor attributes, in all subgraphs."""
    found = [model.graph]
    for graph in found:  # one walk: subgraphs are collected on the way
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
        for node in graph:
            if not node.attributes:
                continue
            for attr in node.attributes.values():
                kind = attr.type
                if kind == _TENSOR:
                    yield attr.value
                elif kind == _TENSORS:
                    yield from attr.value
                elif kind == _GRAPH:
                    found.append(attr.value)
                elif kind == _GRAPHS:
                    found.extend(attr.value)


def model_bytes(model: ir.Model) -> int:
    """Bytes of all constant tensors."""
    return sum(t.nbytes for t in iter_tensors(model))


def parameter_count(model: ir.Model) -> int:
    # math.prod over the dims: what Tensor.size computes, without building a numpy shape per tensor.
    return sum(math.prod(t.shape) for t in iter_tensors(model))


def save(model: ir.Model, path: os.PathLike | str, *, external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD) -> list[str]:
    """Save ``model`` to ``path``; weights go to ``<name>.data`` beside it when the model is large.

    Returns the file names written (relative to the folder).
    """
    path = pathlib.Path(path)
    if model_bytes(model) >= external_data_threshold:
        data_name = path.name + EXTERNAL_DATA_SUFFIX
        ir.save(model, path, external_data=data_name, size_threshold_bytes=1024)
        return [path.name, data_name]
    _save_streamed(model, path)
    return [path.name]


def _save_streamed(model: ir.Model, path: pathlib.Path) -> None:
    """One protobuf file, written without holding the whole serialized model in memory (twice: the
    proto and its bytes, 0.9 GB for BERT-base): the model without its large main-graph initializers,
    then each of them as a message holding just that initializer. Protobuf merges repeated fields of
    concatenated messages, so the file reads back as one model (large initializers listed last)."""
    graph = model.graph
    order = list(graph.initializers.values())
    big = [v for v in order if is_big(v)]
    for value in big:
        graph.initializers.pop(value.name)
    try:
        head = ir.serde.serialize_model(model).SerializeToString()
    finally:
        graph.initializers.clear()
        for value in order:
            graph.initializers.add(value)
    with open(path, "wb") as f:
        f.write(head)
        del head
        for value in big:
            chunk = onnx.ModelProto()
            tensor = chunk.graph.initializer.add()
            ir.serde.serialize_tensor_into(tensor, value.const_value)
            tensor.name = value.name
            f.write(chunk.SerializeToString())


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


class SerializedModel:
    """A model in a form onnxruntime can open: bytes when small, a temporary file with external data when not."""

    def __init__(self, model: ir.Model):
        self._tmp = None
        has_external = any(isinstance(t, ir.ExternalTensor) for t in iter_tensors(model))
        if not has_external and model_bytes(model) < DEFAULT_EXTERNAL_DATA_THRESHOLD:
            self.source: bytes | str = to_proto(model).SerializeToString()
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="tfgraph-session-")
            target = pathlib.Path(self._tmp.name) / "model.onnx"
            # Saving moves external tensors; save a copy of the references, not the model itself.
            ir.save(model, target, external_data="model.onnx.data", size_threshold_bytes=1024)
            self.source = str(target)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> SerializedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def exposed_outputs(model: ir.Model, values: Iterable[ir.Value]) -> Iterator[None]:
    """Make ``values`` (intermediate values of the main graph) extra graph outputs for the ``with``
    block, so one run returns them too; the graph's own outputs are restored afterwards."""
    outputs = model.graph.outputs
    kept = list(outputs)
    outputs.extend(v for v in dict.fromkeys(values) if v not in kept)
    try:
        yield
    finally:
        outputs.clear()
        outputs.extend(kept)


# Weights above this size stay out of the protos made for ONNX's checker / shape inference and for
# verification sessions (onnx_ir's own ``call_onnx_api`` uses the same limit).
BIG_TENSOR_BYTES = 1024


def _check_without_weights(proto: onnx.ModelProto) -> None:
    """ONNX's checker on ``proto`` with its large initializers as typed graph inputs (nothing of the
    weights copied); their sizes are checked against their shapes here instead."""
    light = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if proto.HasField(field):
            setattr(light, field, getattr(proto, field))
    light.opset_import.extend(proto.opset_import)
    light.metadata_props.extend(proto.metadata_props)
    light.functions.extend(proto.functions)
    graph, source = light.graph, proto.graph
    graph.name, graph.doc_string = source.name, source.doc_string
    for field in ("node", "input", "output", "value_info", "sparse_initializer", "quantization_annotation"):
        getattr(graph, field).extend(getattr(source, field))
    inputs = {i.name for i in source.input}
    for tensor in source.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.ByteSize() <= BIG_TENSOR_BYTES \
                or tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED) or not tensor.HasField("raw_data"):
            graph.initializer.add().CopyFrom(tensor)
            continue
        expected = math.prod(tensor.dims) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        packed = tensor.data_type in _PACKED_TYPES
        if not packed and tensor.ByteSize() < expected:  # ByteSize >= the raw data's length
            raise onnx.checker.ValidationError(f"initializer '{tensor.name}': raw_data is smaller than its shape needs "
                                               f"({expected} bytes)")
        if tensor.name not in inputs:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    onnx.checker.check_model(light)


_PACKED_TYPES = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2") if hasattr(onnx.TensorProto, n)}


def hold_weights(model: ir.Model) -> None:
    """Replace initializers that read a protobuf (``TensorProtoTensor``: a fresh numpy copy on every
    ``numpy()``) with numpy-backed tensors: one copy of each weight for the whole compile (the proto
    is freed), which verification sessions then share instead of copying. A tensor whose data does
    not fit its shape raises."""
    for graph in graphs(model):
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.TensorProtoTensor) and tensor.dtype in SHAREABLE_TYPES:
                value.const_value = ir.Tensor(tensor.numpy(), name=tensor.name, doc_string=tensor.doc_string)


SHAREABLE_TYPES = frozenset(getattr(ir.DataType, n) for n in ("FLOAT", "FLOAT16", "DOUBLE", "INT8", "UINT8", "INT16",
                                                         "UINT16", "INT32", "UINT32", "INT64", "UINT64", "BOOL"))


def is_big(value: ir.Value) -> bool:
    tensor = value.const_value
    return tensor is not None and tensor.nbytes > BIG_TENSOR_BYTES


def without_weights(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto whose large main-graph initializers are typed graph inputs instead (no
    weight bytes copied), for ONNX's checker and shape inference; the model itself is left as it was."""
    graph = model.graph
    big = [v for v in graph.initializers.values() if is_big(v)]
    kept_inputs = list(graph.inputs)
    saved = {v.name: v.const_value for v in big}
    present = set(kept_inputs)
    for value in big:
        if value.shape is None:
            value.shape = value.const_value.shape
        if value.dtype is None:
            value.dtype = value.const_value.dtype
        graph.initializers.pop(value.name)
        value.const_value = None
        if value not in present:
            graph.inputs.append(value)
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        graph.inputs.clear()
        graph.inputs.extend(kept_inputs)
        for value in big:
            value.const_value = saved[value.name]
            graph.register_initializer(value)
    return proto


# --- model metadata the compile driver sets for passes -------------------------------------------------
#: The positions a decoder can see (``max_position_embeddings``): sizes lower-cached-attention's constant
#: rotary tables; without it each token's row is computed in the graph.
CONTEXT_KEY = "tfgraph.context_length"
#: ``GENERATION_TASK`` under ``--task text-generation``: the model is compiled to generate, a prompt with an
#: empty cache, then one token per step. onnxruntime's CPU GroupQueryAttention refuses several new tokens
#: after a filled cache at batch > 1 (a chunked prompt), which the exported graph accepts, so without the
#: task lower-cached-attention leaves the blocks to lower-attention (MultiHeadAttention).
TASK_KEY = "tfgraph.task"
GENERATION_TASK = "text-generation"
