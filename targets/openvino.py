"""OpenVINO targets (the onnxruntime-ep-openvino plugin execution provider).

Deployment: onnxruntime with the plugin EP ``OpenVINOExecutionProvider`` from the PyPI package
``onnxruntime-ep-openvino`` (module ``onnxruntime_ep_openvino``), device CPU. The plugin takes its
device from the ``OrtEpDevice`` a session is given (``add_provider_for_devices``), and the precision
from ``load_config`` (OpenVINO properties per device); ``device_type`` in the options is ignored by
the 1.8 plugin (it logs "Provider option device_type is ignored. Please pass one of the enumerated
EP device") and is kept for the older provider-bridge build (``onnxruntime-openvino``).

Why the plugin cannot run on this build machine (2-core AMD EPYC): its factory's
``GetSupportedDevices`` only creates an EP device for an ``OrtHardwareDevice`` whose PCI vendor id
is Intel's (0x8086 = 32902); onnxruntime discovers the CPU here as vendor "AMD", id 0x1022 = 4130
(``onnxruntime.get_ep_devices()`` lists only the CPU EP's device after registering the plugin).
Registering the library under a name ending in ``.virtual`` (onnxruntime's opt-in for virtual
devices) makes the plugin list four *virtual NPU* devices (``is_virtual=1``, ``npu_platform``
4000/5010/5020/6010) for cross-compiling, none for the CPU, and a session on them fails in the NPU
compiler ("Cannot load library libopenvino_intel_npu_compiler_loader.so"). ``providers=
["OpenVINOExecutionProvider"]`` by name silently gives a CPU-EP-only session. OpenVINO itself runs
on this CPU: plain ``openvino`` 2026.4 (``Core().available_devices == ['CPU']``, "AMD EPYC", AVX2)
and onnxruntime-openvino 1.24.1's built-in OpenVINO EP (tried in a side virtualenv) both run the
compiled models here. So the checks on this machine use plain OpenVINO (``run_openvino``,
``query_placement`` below); on an Intel host the same artifact runs on the plugin EP.

Pass pipeline, chosen by measurement (MiniLM = all-MiniLM-L6-v2, ``tfgraph export minilm``,
dynamo; plain OpenVINO 2026.4 CPU, ``INFERENCE_PRECISION_HINT=f32``, 2 threads on a shared 2-core
EPYC under load ~7, 20-30 interleaved runs, median ratio to the raw export; /tmp scripts, the
benchmark in benchmarks/bench_openvino.py):

=====================================================  ============  ============
variant                                                 b1 s128       b8 s128
=====================================================  ============  ============
raw export                                              1.00          1.00
cleanup only (no fusion)                                0.95 / 0.71   0.96 / 1.03
neutral attention inlined to standard ops               0.99 / 0.95   0.97 / 0.96
  same, without the IsNaN/Where guard after Softmax     0.91 / 0.80   0.86 / 0.88
packed com.microsoft.Attention (this profile)           0.91 / 0.79   0.84 / 0.87
=====================================================  ============  ============

(two rounds each.) OpenVINO's ONNX frontend converts ``com.microsoft.Attention`` (and
``MultiHeadAttention``) into its own attention subgraph; the inlined neutral form pays for the NaN
guard (IsNaN + Where on every score tensor). On the real EP the difference is larger:
onnxruntime-openvino 1.24.1's OpenVINO EP (side virtualenv, ``record_ep_graph_assignment_info``)
leaves every ``IsNaN`` to the CPU EP, cutting MiniLM into 8 OpenVINO subgraphs, while the packed
Attention graph runs as one. It also left ``com.microsoft.MultiHeadAttention`` (the lowering of
head-split blocks: KV-cache decoders) on the CPU EP; plain OpenVINO converts it. Those two are the
documented fallbacks. LayerNormalization (ai.onnx, opset 17+) and Gelu (opset 20) are taken as
exported: OpenVINO maps them to MVN and Gelu itself.

Windowed (banded) attention goes to the blocked form in standard ops (``window_to="blocked"``,
``window_kernel="standard"``): never a window attribute (OpenVINO silently ignores Attention-23
windows) and never onnxruntime's contrib kernels inside the tiles.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Mapping
from typing import Any

from tfgraph.passes.registry import PassSpec
from tfgraph.targets.cpu import CLEANUP, FUSION
from tfgraph.targets.profile import Provider, Quantization, Target, Tolerance, phases

PLUGIN = "onnxruntime_ep_openvino"
EP = "OpenVINOExecutionProvider"

OV_LOWERING = (
    PassSpec("pack-projections"),
    PassSpec(
        "lower-attention",
        {"rules": [{"rule": "window", "mode": "blocked", "min_sequence": 1024, "block": None, "kernel": "standard"},
                   # OpenVINO's ONNX frontend reads Attention without its scale attribute: a non-default
                   # scale (T5: none) goes into the packed Q weights instead.
                   {"rule": "packed", "scale_in_weights": True}, "multi-head"]},
    ),
    # RMSNorm (and any neutral op left) as its standard-ONNX body: OpenVINO fuses RMS itself.
    PassSpec("inline-neutral-ops"),
    PassSpec("dedup-initializers"),
    PassSpec("cse"),
    PassSpec("fold-constants"),
    PassSpec("dedup-initializers"),  # folding can make equal constants again (a 5-D local-block einsum's shapes)
    PassSpec("remove-dead"),
)

# What the OpenVINO EP was seen to leave to the CPU EP on tfgraph's output (see the docstring):
# head-split attention blocks (KV cache) lowered to MultiHeadAttention.
OV_FALLBACKS = ("com.microsoft.MultiHeadAttention",)

# onnxruntime's own graph optimizations off: the EP takes the graph as compiled (level-2 fusions would
# hand it contrib ops it does not take, e.g. FastGelu, BiasGelu), OpenVINO optimizes it itself.
OV_SESSION = {"graph_optimization_level": "ORT_DISABLE_ALL"}

ATTENTION = (
    "packed com.microsoft.Attention (OpenVINO's frontend converts it); head-split blocks (KV cache) "
    "com.microsoft.MultiHeadAttention; windowed blocks the blocked form in standard ops (no window attributes)"
)


def _options(hint: str, precision: str | None = None) -> dict[str, str]:
    """Provider options of the OpenVINO EP on CPU with OpenVINO's ``INFERENCE_PRECISION_HINT`` pinned
    through ``load_config`` (the EP's ``precision`` takes only FP32/ACCURACY on CPU)."""
    return {
        "device_type": "CPU",
        **({"precision": precision} if precision else {}),
        "load_config": json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": hint}}),
    }


OPENVINO_FP32 = Target(
    name="openvino-fp32",
    description="OpenVINO EP (onnxruntime-ep-openvino) on CPU, fp32 pinned: canonicalized graph, attention as packed "
    "com.microsoft.Attention, windows blocked in standard ops",
    providers=(Provider(EP, _options("f32", "FP32"), plugin=PLUGIN, extra="openvino"),),
    precision="fp32",
    phases=phases(normalize=CLEANUP, fuse=FUSION, lower=OV_LOWERING),
    # OpenVINO's fp32 kernels differ from onnxruntime's in summation order only: 1e-6 measured on the
    # small built-in models (tests/test_openvino.py).
    tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    session_options=OV_SESSION,
    allowed_fallbacks=OV_FALLBACKS,
    opset=(17, 22),
    attention=ATTENTION,
    standalone_runtime="tfgraph.targets.openvino",
)

# bf16: OpenVINO's own CPU default on hardware with bf16 (AMX / AVX512_BF16); asked for explicitly.
# On a CPU without it (this AMD EPYC: OPTIMIZATION_CAPABILITIES FP32, INT8, BIN, EXPORT_IMPORT) the
# compiled model reports INFERENCE_PRECISION_HINT float32: the request is ignored and it runs fp32.
# Tolerance: bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); activations round at every
# op, so MiniLM hidden states (|x| up to ~10) move by up to a few 1e-2.
OPENVINO_BF16 = Target(
    name="openvino-bf16",
    description="OpenVINO EP on CPU, bf16 inference precision (OpenVINO's default where the CPU has bf16; "
    "fp32 on CPUs without it): openvino-fp32's graph",
    providers=(Provider(EP, _options("bf16"), plugin=PLUGIN, extra="openvino"),),
    precision="bf16",
    phases=phases(normalize=CLEANUP, fuse=FUSION, lower=OV_LOWERING),
    tolerance=Tolerance(atol=5e-2, rtol=5e-2),
    session_options=OV_SESSION,
    allowed_fallbacks=OV_FALLBACKS,
    opset=(17, 22),
    attention=ATTENTION,
    standalone_runtime="tfgraph.targets.openvino",
)

# int8: static QDQ, uint8 activations (asymmetric, calibrated) and int8 weights (symmetric, per output
# channel) on MatMul inputs: the scheme OpenVINO's low-precision transformations fuse into int8
# kernels (NNCF's default). uint8 QDQ runs correctly; 16-bit QDQ gave NaN/wrong results on OpenVINO,
# so this profile never emits it (tests/test_openvino.py checks every Q/DQ's integer type).
OPENVINO_INT8_SCHEME = Quantization(
    mode="static",
    activation_type="uint8",
    weight_type="int8",
    activation_symmetric=False,
    weight_symmetric=True,
    per_channel=True,
    placement={"MatMul": (0, 1)},
    weight_axes={"MatMul": {1: 1}},
    calibrator="minmax",
    reason="OpenVINO fuses QDQ into int8 kernels: u8 activations, s8 per-channel weights (8-bit only: "
    "16-bit QDQ gave NaN/wrong results on OpenVINO)",
)

OPENVINO_INT8 = Target(
    name="openvino-int8",
    description="OpenVINO EP on CPU, int8: openvino-fp32's graph, MatMuls as uint8/int8 QDQ (static, calibrated)",
    providers=(Provider(EP, _options("f32", "FP32"), plugin=PLUGIN, extra="openvino"),),
    precision="int8",
    phases=phases(normalize=CLEANUP, fuse=FUSION, lower=OV_LOWERING,
                  precision=(PassSpec("quantize", OPENVINO_INT8_SCHEME.to_options()),),
                  finalize=(PassSpec("dedup-initializers"), PassSpec("remove-dead"))),
    # Checks after quantization compare QDQ graphs run on onnxruntime; the change against fp32 is the
    # accuracy report's (min_cosine).
    tolerance=Tolerance(atol=0.25, rtol=0.05),
    session_options=OV_SESSION,
    quantization=OPENVINO_INT8_SCHEME,
    min_cosine=0.99,
    allowed_fallbacks=OV_FALLBACKS,
    opset=(17, 22),
    attention=ATTENTION,
    standalone_runtime="tfgraph.targets.openvino",
)

TARGETS: tuple = (OPENVINO_FP32, OPENVINO_BF16, OPENVINO_INT8)


# --- plain OpenVINO: the runtime checks on machines where the plugin EP lists no device -----------

def openvino_config(target: Target) -> dict[str, str]:
    """The OpenVINO CPU properties the target's provider options pin (``load_config``)."""
    options = target.providers[0].options
    config = json.loads(options.get("load_config", "{}")).get("CPU", {})
    return {k: str(v) for k, v in config.items()}


def _model_path(model: Any, stack) -> str:
    import tempfile

    import onnx_ir as ir

    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="tfgraph-ov-"))
    path = os.path.join(folder, "model.onnx")
    if isinstance(model, ir.Model):
        ir.save(model, path, external_data="model.onnx.data")
    else:
        import onnx

        onnx.save(model, path, save_as_external_data=True, location="model.onnx.data")
    return path


def run_openvino(model: Any, feeds: Mapping[str, Any], target: Target | None = None,
                 config: Mapping[str, str] | None = None) -> dict:
    """Run ``model`` (path, onnx_ir or ONNX model) on plain OpenVINO CPU with the target's pinned
    precision; outputs by name."""
    import contextlib

    import openvino as ov

    cfg = dict(openvino_config(target) if target is not None else {}, **(config or {}))
    with contextlib.ExitStack() as stack:
        compiled = ov.Core().compile_model(_model_path(model, stack), "CPU", cfg)
        result = compiled(dict(feeds))
        return {out.get_any_name(): result[out] for out in compiled.outputs}


def query_placement(model: Any, profile: Target):
    """Placement report from plain OpenVINO for a model the EP cannot load here: each ONNX node
    that OpenVINO's ONNX frontend cannot convert, or that ``Core.query_model(…, "CPU")`` does not
    take, counts as a CPU fallback. Returns a ``tfgraph.deploy.runtime.Placement``."""
    import contextlib

    import onnx
    import openvino as ov
    from openvino.frontend import FrontEndManager

    from tfgraph.deploy.runtime import Placement

    with contextlib.ExitStack() as stack:
        path = _model_path(model, stack)
        frontend = FrontEndManager().load_by_framework("onnx")
        converted = frontend.convert_partially(frontend.load(path))
        ops = list(converted.get_ordered_ops())
        unconverted = [op for op in ops if "FrameworkNode" in op.get_type_name()]
        note = f"plain OpenVINO {ov.__version__} (ONNX frontend + Core.query_model on CPU)"
        if unconverted:
            supported: set[str] = {op.get_friendly_name() for op in ops if op not in unconverted}
            note += "; query_model skipped: the frontend left nodes unconverted"
        else:
            supported = set(ov.Core().query_model(converted, "CPU"))
        rejected: set[str] = set()
        for op in ops:
            if op.get_type_name() in ("Parameter", "Result", "Constant"):
                continue
            if op.get_friendly_name() not in supported:
                for out in op.outputs():
                    rejected |= set(out.get_names())
        proto = onnx.load(path, load_external_data=False)
    fallback, total = [], 0
    for node in proto.graph.node:
        total += 1
        if any(name in rejected for name in node.output if name):
            fallback.append({"name": node.name, "op_type": node.op_type, "domain": node.domain,
                             "reason": "not converted or not supported by OpenVINO CPU"})
    names = [p.name for p in profile.providers]
    counts = collections.Counter({names[0]: total - len(fallback)})
    if fallback:
        counts["CPUExecutionProvider"] = len(fallback)
    return Placement(f"openvino {ov.__version__} query_model", names, dict(counts), fallback,
                     list(profile.allowed_fallbacks), note=note)


# --- the standalone-runtime interface (Target.standalone_runtime) --------------------------------
# Where the plugin EP lists no device (any non-Intel CPU), compile verifies on plain OpenVINO and
# takes the placement report from it: the same OpenVINO runtime and ONNX frontend the EP embeds.
NAME = "OpenVINO (plain openvino runtime, CPU)"


def unavailable_reason() -> str | None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "the openvino package is not installed (extra 'openvino')"
    return None


run = run_openvino
placement = query_placement


def runtime_precision(target: Target) -> dict[str, Any] | None:
    """The precision OpenVINO's CPU plugin actually compiles this target's models at: it ignores a
    bf16 request on CPUs without bf16 (no AVX512_BF16 / AMX) and runs f32. Read from a compiled
    one-node model with the target's configuration; None when openvino is not installed."""
    if unavailable_reason() is not None:
        return None
    import openvino as ov
    from onnx import TensorProto, helper

    config = openvino_config(target)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    core = ov.Core()
    compiled = core.compile_model(core.read_model(helper.make_model(graph).SerializeToString(), b""), "CPU", config)
    used = _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
    caps = [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    requested = _precision_name(config.get("INFERENCE_PRECISION_HINT", "f32"))
    return {
        "requested": requested,
        "used": used,
        "how": f"OpenVINO CPU compiled the model at {used}"
               + (f" although {requested} was requested" if used != requested else "")
               + f"; CPU capabilities {', '.join(caps)}",
    }


def _precision_name(value: Any) -> str:
    """OpenVINO names element types several ways (``bf16``, ``<Type: 'bfloat16'>``, ``f32``, ``float32``)."""
    text = str(value).lower()
    if "bf16" in text or "bfloat16" in text:
        return "bf16"
    if "f16" in text or "float16" in text:
        return "f16"
    return "f32"
