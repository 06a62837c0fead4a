"""``tfgraph.compile``: model in, verified artifact out — a short driver over :mod:`tfgraph.compiler.phases`."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import onnx
import onnx_ir as ir

from tfgraph.compiler import phases
from tfgraph.deploy.artifact import Artifact
from tfgraph.compiler.input_checks import pin_input_shapes  # noqa: F401 - part of this module's API
from tfgraph.compiler.options import CompileOptions
from tfgraph.compiler.sources import resolve_model  # noqa: F401 - part of this module's API
from tfgraph.targets import Target, get_target


def compile(  # noqa: A001 - the product's verb
    model: str | os.PathLike | ir.Model | onnx.ModelProto,
    target: str | Target = "cpu-fp32",
    options: CompileOptions | None = None,
    *,
    output: str | os.PathLike | None = None,
    **overrides: Any,
) -> Artifact:
    """Compile ``model`` for ``target`` and return the :class:`Artifact` (written to ``output`` if given).

    Settings come as a :class:`~tfgraph.compiler.options.CompileOptions` (``options``) and/or keyword
    ``overrides`` of its fields, e.g. ``compile("model.onnx", "cpu-int8", verify=False)``.

    ``model`` is an ``.onnx`` path, a built-in model name (exported first with
    ``exporter``; ``attention`` picks eager or SDPA attention for Hugging Face models;
    ``approximate_attention="window=N[,global=G]"`` restricts attention to a local window —
    an approximation, reported with its output change against the dense model), a local Hugging Face folder, or an in-memory ``onnx_ir.Model`` /
    ``onnx.ModelProto``. With ``verify`` (the default) every pass is checked
    numerically against the input model on ``inputs`` (an ``.npz`` path or a dict of
    arrays) or on inputs generated from the graph's signature at ``shapes``; the first
    pass that breaks the outputs raises :class:`VerificationError`. ``extra_passes``
    run after the target's pipeline (registered names, ``name:key=value`` strings,
    :class:`PassSpec` or pass instances). With ``strict``, attention blocks left
    unfused raise :class:`StrictError` (exit 1) instead of a warning in the manifest.

    Reduced precision (targets with a ``quantization`` scheme, passes that use calibration, or
    ``max_drop``): ``calibration`` is an ``.npz`` of feeds, a ``.txt`` of sentences (tokenized with
    ``tokenizer``, by default the model's own folder for Hugging Face / built-in models), a dict of
    arrays, or None (the verification inputs if given, else generated inputs, with a warning). The
    manifest's ``precision`` section reports the output change against the fp32 input model on the
    calibration inputs (max abs, cosine, sentence-embedding cosine), and ``max_drop`` (default:
    ``1 - target.min_cosine``) reverts the most harmful quantized nodes to float until
    ``1 - cosine <= max_drop``.

    ``task="text-generation"``: a causal LM with its KV cache (exported with one from a Hugging Face
    folder; an ``.onnx`` must have one), verified on a prompt and decode steps (:mod:`tfgraph.compiler.decoder`);
    the manifest's ``generation`` section is what :func:`tfgraph.load_generator` reads.
    """
    opts = CompileOptions.make(options, overrides)
    profile = get_target(target)
    if opts.pass_options:
        profile = profile.with_pass_options(opts.pass_options)
    with contextlib.ExitStack() as stack:
        compilation = phases.plan(profile, opts, output, stack)
        clock = compilation.clock  # time and peak memory of each step, in the manifest's "compile" section
        with clock.measure("load"):
            phases.load(compilation, model)
        for phase in phases.PHASES:
            with clock.measure(phase.__name__):
                phase(compilation)
        return phases.package(compilation)
