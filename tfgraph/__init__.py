"""tfgraph: an ONNX graph-rewriting compiler for Transformer models.

Library first: :func:`compile` turns a model into a verified :class:`Artifact`,
:func:`load` opens a written artifact as an onnxruntime session, and custom passes
subclass :class:`Pass` and register with :func:`register_pass`.
"""

from __future__ import annotations

import onnx_ir as _ir

from tfgraph._version import __version__
from tfgraph.deploy.artifact import Artifact, load
from tfgraph.compiler.driver import compile
from tfgraph.compiler.options import CompileOptions
from tfgraph.errors import BadInputError, ProviderUnavailableError, TfgraphError, VerificationError
from tfgraph.deploy.executor import PipelineExecutor
from tfgraph.deploy.generate import Generator, load_generator
from tfgraph.compiler.instruments import Instrument, PassRecord
from tfgraph.passes.registry import PassSpec, available_passes, register_pass
from tfgraph.compiler.passmanager import PassManager
from tfgraph.compiler.stages import Pipeline, partition
from tfgraph.targets import Target, get_target, list_targets, register_target
from tfgraph.deploy.text import TextEncoder, load_tokenizer

from tfgraph.compiler.pass_context import install_default as _install_default_pass_context

_install_default_pass_context()

#: Base class for in-place custom passes (onnx-ir's ``InPlacePass``).
Pass = _ir.passes.InPlacePass
PassResult = _ir.passes.PassResult

__all__ = [
    "Artifact",
    "BadInputError",
    "CompileOptions",
    "Generator",
    "Instrument",
    "Pass",
    "PassManager",
    "PassRecord",
    "PassResult",
    "PassSpec",
    "Pipeline",
    "PipelineExecutor",
    "ProviderUnavailableError",
    "Target",
    "TextEncoder",
    "TfgraphError",
    "VerificationError",
    "__version__",
    "available_passes",
    "compile",
    "get_target",
    "list_targets",
    "load",
    "load_generator",
    "load_tokenizer",
    "partition",
    "register_pass",
    "register_target",
]
