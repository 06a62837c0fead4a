"""Export a built-in reference model or a local Hugging Face checkpoint to ONNX.

Two exporters are supported:

* ``dynamo`` (default): ``torch.onnx.export(..., dynamo=True)`` with
  ``dynamic_shapes`` built from ``torch.export.Dim`` objects named after the
  model's axes ("batch", "sequence", "past_sequence"); torch picks the opset
  unless one is given.
* ``torchscript``: the legacy tracer, ``torch.onnx.export(..., dynamo=False)``
  with ``dynamic_axes``; opset 18 unless one is given.

Either way the result is one self-contained ``.onnx`` file (weights embedded,
unless the model exceeds protobuf's 2 GB limit, in which case the weights go to
``<output>.data`` beside it), whose graph inputs and outputs carry the dynamic
dimension names of the model's :class:`~tfgraph.models.ModelSpec` (for example
``present_key_0`` has ``[batch, heads, total_sequence, head_dim]``).
The exporters' progress output and warnings are silenced; failures raise
:class:`~tfgraph.errors.BadInputError` with a one-line message. The file is
written to a temporary folder next to ``output`` and moved into place, so a
failed export leaves nothing behind.

Hugging Face models (local checkpoint folders and ``minilm``) are exported with
the attention implementation given by ``attention`` (transformers'
``attn_implementation``): ``"sdpa"`` by default, as transformers does, or
``"eager"``. The built-in reference models have one attention form (explicit
MatMul/Softmax): ``"eager"`` is accepted for them, ``"sdpa"`` is refused.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import logging
import os
import pathlib
import shutil
import tempfile
import warnings
from typing import TYPE_CHECKING, Iterator

from tfgraph.errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from tfgraph.models import ModelSpec

__all__ = ["EXPORTERS", "TASKS", "export", "resolve_model"]

#: Exporter names accepted by :func:`export`.
EXPORTERS = ("dynamo", "torchscript")
#: Values of ``task``: None (the model's plain forward pass) or a causal LM with its KV cache.
TASKS = ("text-generation",)
#: Opset used by the TorchScript exporter when none is given.
TORCHSCRIPT_DEFAULT_OPSET = 18
#: Above this many bytes of parameters the weights go to an external data file.
_EMBED_LIMIT = 1_800_000_000


def resolve_model(model: str | os.PathLike, attention: str | None = None, task: str | None = None) -> "ModelSpec":
    """The :class:`~tfgraph.models.ModelSpec` for a built-in name or a local HF folder.

    ``attention`` is passed to :func:`~tfgraph.models.get_model` or
    :func:`~tfgraph.models.hf_model` (None: the model's default). ``task="text-generation"``
    gives a causal LM with its KV cache (see :mod:`tfgraph.models.hf_cache`; ``gpt-small`` /
    ``gpt-base`` become their ``-kv`` forms).

    A built-in name wins over a folder of the same name in the current
    directory (write ``./name`` for the folder). Raises BadInputError for an
    unknown name, a path that is not a Hugging Face checkpoint folder, or
    missing optional dependencies.
    """
    from tfgraph.models import check_attention, get_model, hf_model, list_models

    check_attention(attention)
    if task is not None and task not in TASKS:
        raise BadInputError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    text = os.fspath(model)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    if text in list_models():
        if task == "text-generation" and text in ("gpt-small", "gpt-base"):
            text += "-kv"
        spec = get_model(text, attention)
        if task == "text-generation" and "past_key_0" not in spec.input_names:
            raise BadInputError(f"--task text-generation: {text} is not a causal language model")
        return spec
    path = pathlib.Path(text)
    if path.exists():
        spec = hf_model(path, attention)
        if task == "text-generation":
            from tfgraph.models.hf_cache import cache_spec

            spec = cache_spec(spec, path)
        return spec
    if os.sep in text or (os.altsep and os.altsep in text) or text.startswith("."):
        raise BadInputError(
            f"no such model folder {text!r}; give a built-in model ({', '.join(list_models())}) "
            "or a Hugging Face checkpoint folder"
        )
    return get_model(text, attention)  # raises the "unknown model" error


def export(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    exporter: str = "dynamo",
    batch: int = 2,
    seq: int = 16,
    opset: int | None = None,
    attention: str | None = None,
    task: str | None = None,
) -> pathlib.Path:
    """Export ``model`` (built-in name or local HF checkpoint folder) to the ONNX file ``output``.

    ``batch`` and ``seq`` are the shapes the exporter traces with (at least 2
    each, so that no dynamic axis gets specialized); the exported graph accepts
    any batch and sequence length (and past length, for ``*-kv`` models).
    ``opset`` defaults to torch's choice for dynamo and 18 for TorchScript.
    ``attention`` (``"sdpa"``, ``"eager"`` or None) picks transformers'
    attention implementation for Hugging Face models; None means ``"sdpa"``
    (:data:`tfgraph.models.DEFAULT_ATTENTION`, transformers' default; ``"eager"``
    for a model class without SDPA). For the plain-torch reference models
    (bert-*, gpt-*, albert-*, local-*) ``"eager"`` is what they are and
    ``"sdpa"`` is refused.
    ``task="text-generation"`` exports a causal LM with its KV cache (past/present inputs and outputs).
    Returns the path of the written file. Raises BadInputError for an unknown
    exporter, model or attention, bad sizes, missing torch, or a failed export.
    """
    if exporter not in EXPORTERS:
        raise BadInputError(f"unknown exporter {exporter!r}; choose one of: {', '.join(EXPORTERS)}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 2:
        raise BadInputError(f"export batch size must be an integer of at least 2, got {batch!r}")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 2:
        raise BadInputError(f"export sequence length must be an integer of at least 2, got {seq!r}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 7):
        raise BadInputError(f"opset must be an integer of at least 7, got {opset!r}")
    from tfgraph.models import check_attention

    check_attention(attention)
    if importlib.util.find_spec("torch") is None:
        raise BadInputError("exporting models needs torch; install tfgraph[export]")
    if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        raise BadInputError("the dynamo exporter needs onnxscript; install tfgraph[export]")

    destination = pathlib.Path(output)
    if destination.is_dir():
        raise BadInputError(f"export output {destination} is a folder; give a file name such as model.onnx")
    spec = resolve_model(model, attention, task)

    import torch

    with _quiet():
        module = spec.build()
        inputs = spec.example_inputs(batch, seq)
    _check_positions(spec, inputs, seq)

    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        workdir = pathlib.Path(tempfile.mkdtemp(prefix=".tfgraph-export-", dir=destination.parent))
    except OSError as error:
        raise BadInputError(f"cannot write to {destination.parent}: {error.strerror or error}") from error
    try:
        staged = workdir / destination.name
        external = sum(p.numel() * p.element_size() for p in module.parameters()) > _EMBED_LIMIT
        try:
            with _quiet(), torch.no_grad():
                if exporter == "dynamo":
                    _export_dynamo(module, spec, inputs, staged, opset, external)
                else:
                    _export_torchscript(module, spec, inputs, staged, opset)
        except BadInputError:
            raise
        except Exception as error:
            raise BadInputError(
                f"the {exporter} exporter failed on {spec.name}: {_describe(error)}"
                + ("; try --exporter torchscript" if exporter == "dynamo" else "; try --exporter dynamo")
            ) from error
        _name_dimensions(staged, spec)
        for produced in workdir.iterdir():  # the model and, for huge models, its external data
            os.replace(produced, destination.parent / produced.name)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return destination


def _check_positions(spec: "ModelSpec", inputs: tuple, seq: int) -> None:
    """BadInputError when the traced length exceeds the model's position table."""
    if spec.max_positions is None:
        return
    past = 0
    cached = [i for i, name in enumerate(spec.input_names) if name.startswith("past")]
    if cached:
        past = int(inputs[cached[0]].shape[2])
    if seq + past > spec.max_positions:
        detail = f"sequence {seq} + past {past}" if past else f"sequence length {seq}"
        raise BadInputError(f"{detail} exceeds the {spec.max_positions} positions of {spec.name}")


def _export_dynamo(module, spec, inputs, path: pathlib.Path, opset: int | None, external: bool) -> None:
    import torch

    dims: dict[str, torch.export.Dim] = {}
    per_input = []
    for name in spec.input_names:
        axes = {}
        for axis, dim_name in spec.dynamic_axes.get(name, {}).items():
            if dim_name not in dims:
                dims[dim_name] = torch.export.Dim(dim_name)
            axes[axis] = dims[dim_name]
        per_input.append(axes)
    program = torch.onnx.export(
        module,
        tuple(inputs),
        dynamo=True,
        input_names=list(spec.input_names),
        output_names=list(spec.output_names),
        dynamic_shapes=_shape_structure(module, per_input),
        opset_version=opset,
        optimize=True,
        verbose=False,
    )
    program.save(str(path), external_data=external)


def _shape_structure(module, per_input: list[dict]) -> tuple:
    """Arrange per-input dynamic shapes like ``forward``'s arguments
    (non-empty ``*args`` become one nested tuple, as torch.export expects)."""
    result: list = []
    index = 0
    for parameter in inspect.signature(module.forward).parameters.values():
        if parameter.kind == inspect.Parameter.VAR_POSITIONAL:
            if index < len(per_input):
                result.append(tuple(per_input[index:]))
            index = len(per_input)
            break
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            if index == len(per_input):
                break
            result.append(per_input[index])
            index += 1
    if index != len(per_input):
        raise BadInputError(f"{type(module).__name__}.forward takes fewer inputs than {len(per_input)}")
    return tuple(result)


def _export_torchscript(module, spec, inputs, path: pathlib.Path, opset: int | None) -> None:
    import torch

    torch.onnx.export(
        module,
        tuple(inputs),
        str(path),
        dynamo=False,
        input_names=list(spec.input_names),
        output_names=list(spec.output_names),
        dynamic_axes={name: dict(axes) for name, axes in spec.dynamic_axes.items()},
        opset_version=opset or TORCHSCRIPT_DEFAULT_OPSET,
        do_constant_folding=True,
    )


def _name_dimensions(path: pathlib.Path, spec: "ModelSpec") -> None:
    """Give the graph's inputs and outputs the dynamic dimension names of ``spec``.

    Dynamo names output dimensions after expressions ("past_sequence + sequence");
    only dimensions that are already symbolic are renamed, never fixed ones.
    """
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    changed = False
    for value in list(proto.graph.input) + list(proto.graph.output):
        axes = spec.dynamic_axes.get(value.name, {})
        dims = value.type.tensor_type.shape.dim
        for axis, dim_name in axes.items():
            if axis < len(dims) and dims[axis].HasField("dim_param") and dims[axis].dim_param != dim_name:
                dims[axis].dim_param = dim_name
                changed = True
    if changed:
        onnx.save(proto, str(path))


def _describe(error: BaseException) -> str:
    """One line naming the innermost cause of an exporter failure."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    return f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence warnings, progress prints and torch's warning-level logging.

    Exceptions still propagate; only chatter is dropped.
    """
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    sink = io.StringIO()
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
