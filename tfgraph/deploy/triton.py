"""Export an artifact as a Triton Inference Server model repository (onnxruntime backend).

One model per stage (``<name>_stage<i>/1/model.onnx`` + ``config.pbtxt``) and an ensemble
``<name>`` that chains them (``platform: "ensemble"``); a single-model artifact gives one
model. Configs are built as Triton ``ModelConfig`` protobuf messages from the schema that
the ``tritonclient`` package ships (``model_config_pb2``) and written with protobuf's text
format, so :func:`validate_repository` can parse them back with the same schema.

From the artifact's manifest and model:

* instance groups are ``KIND_GPU`` when the target runs on a GPU execution provider (CUDA,
  TensorRT), else ``KIND_CPU`` (``instance_kind`` overrides);
* a TensorRT target gets the onnxruntime backend's TensorRT accelerator block
  (``optimization { execution_accelerators { gpu_execution_accelerator ... name: "tensorrt" }}``)
  with ``precision_mode`` from the profile's TensorRT options (``INT8`` / ``FP16`` / ``FP32``) and
  its engine/timing caches;
* when every input and output shares one dynamic leading axis (the batch), ``max_batch_size``
  is set (default :data:`DEFAULT_MAX_BATCH`, ``max_batch_size`` overrides; 0 turns batching off),
  the batch axis leaves ``dims`` (Triton adds it), and the models get ``dynamic_batching``.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shutil
import sys

from tfgraph.errors import BadInputError

_TYPES = {
    "float32": "TYPE_FP32", "float": "TYPE_FP32", "float16": "TYPE_FP16", "double": "TYPE_FP64", "float64": "TYPE_FP64",
    "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64", "bool": "TYPE_BOOL",
}


def model_config_pb2():
    """Triton's ``model_config_pb2`` from the tritonclient package (without importing its gRPC client)."""
    name = "tfgraph._triton_model_config_pb2"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError("Triton export needs the tritonclient package: pip install 'tfgraph[triton]'")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        raise BadInputError(f"tritonclient is installed but has no {path.name}")
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


# Execution providers that Triton's onnxruntime backend runs in GPU instances.
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
TENSORRT = "TensorrtExecutionProvider"
#: max_batch_size when the artifact has a dynamic batch axis (as ``tfgraph serve --max-batch``).
DEFAULT_MAX_BATCH = 8
INSTANCE_KINDS = ("auto", "cpu", "gpu")
# TensorRT EP options that the onnxruntime backend takes as accelerator parameters of the same name.
_TRT_PARAMETERS = ("trt_engine_cache_enable", "trt_timing_cache_enable")


def _tensor(message, entry: dict, pb, *, batched: bool = False) -> None:
    message.name = entry["name"]
    dtype = _TYPES.get(entry["dtype"])
    if dtype is None:
        raise BadInputError(f"tensor '{entry['name']}' has dtype {entry['dtype']}, which has no Triton type")
    message.data_type = pb.DataType.Value(dtype)
    shape = entry["shape"]
    if batched:
        shape = shape[1:]  # Triton prepends the batch axis itself when max_batch_size > 0
    message.dims.extend([d if isinstance(d, int) else -1 for d in shape] if shape is not None else [-1])


def batch_axis(stages: list[dict]) -> str | None:
    """The name of the dynamic leading axis every stage input and output shares, else None."""
    names = set()
    for stage in stages:
        for entry in [*stage["inputs"], *stage["outputs"]]:
            shape = entry["shape"]
            if not shape or isinstance(shape[0], int) or shape[0] is None:
                return None
            names.add(shape[0])
    return names.pop() if len(names) == 1 else None


def _instance_kind(manifest: dict, requested: str) -> str:
    if requested not in INSTANCE_KINDS:
        raise BadInputError(f"--instance-kind {requested}: choose one of {', '.join(INSTANCE_KINDS)}")
    if requested != "auto":
        return f"KIND_{requested.upper()}"
    names = [p.get("name") for p in manifest.get("providers") or []]
    return "KIND_GPU" if any(n in GPU_PROVIDERS for n in names) else "KIND_CPU"


def _tensorrt_accelerator(config, manifest: dict) -> None:
    provider = next((p for p in manifest.get("providers") or [] if p.get("name") == TENSORRT), None)
    if provider is None:
        return
    options = provider.get("options") or {}
    mode = "INT8" if options.get("trt_int8_enable") else "FP16" if options.get("trt_fp16_enable") else "FP32"
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    accelerator.parameters["precision_mode"] = mode
    for key in _TRT_PARAMETERS:
        if key in options:
            accelerator.parameters[key] = "1" if options[key] in (True, 1, "1", "true", "True") else "0"


def _model_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text) or "model"


def export_triton(artifact: str | os.PathLike, output: str | os.PathLike, *, name: str | None = None,
                  force: bool = False, instance_count: int = 1, instance_kind: str = "auto",
                  max_batch_size: int | None = None) -> dict:
    """Write the repository atomically; returns a description (models, instance kind, batching).

    ``instance_kind``: ``auto`` (GPU for CUDA/TensorRT targets), ``cpu`` or ``gpu``;
    ``max_batch_size``: None (:data:`DEFAULT_MAX_BATCH` when the artifact has a dynamic batch
    axis, else 0), 0 (no batching) or a positive size (needs that axis)."""
    from google.protobuf import text_format

    from tfgraph.deploy.artifact import MODEL_FILE, atomic_write_dir, read_manifest

    pb = model_config_pb2()
    src = pathlib.Path(artifact)
    manifest = read_manifest(src)
    name = _model_name(name or src.resolve().name)
    pipe = manifest.get("pipeline")
    if pipe is None:
        from tfgraph import ir as tir

        model = tir.load(src / MODEL_FILE).model
        from tfgraph.signature import _describe

        stages = [{"file": MODEL_FILE, "inputs": [_describe(v, None) for v in model.graph.inputs],
                   "outputs": [_describe(v, None) for v in model.graph.outputs]}]
        ios = {"inputs": stages[0]["inputs"], "outputs": stages[0]["outputs"]}
    else:
        stages = pipe["stages"]
        ios = pipe
    single = len(stages) == 1
    models = []
    kind = _instance_kind(manifest, instance_kind)
    axis = batch_axis(stages)
    if max_batch_size is None:
        max_batch_size = DEFAULT_MAX_BATCH if axis is not None else 0
    elif not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 0:
        raise BadInputError(f"--max-batch-size {max_batch_size}: a size is an integer >= 0 (0: no batching)")
    elif max_batch_size and axis is None:
        raise BadInputError(f"--max-batch-size {max_batch_size}: the artifact's inputs and outputs do not share a "
                            "dynamic leading (batch) axis, so Triton cannot batch it; use 0")
    batched = max_batch_size > 0

    def write(tmp: pathlib.Path) -> None:
        for i, stage in enumerate(stages):
            model_name = name if single else f"{name}_stage{i}"
            folder = tmp / model_name / "1"
            folder.mkdir(parents=True)
            source = src / stage["file"]
            shutil.copyfile(source, folder / "model.onnx")
            data = source.with_name(source.name + ".data")
            if data.is_file():
                shutil.copyfile(data, folder / data.name)
            config = pb.ModelConfig(name=model_name, platform="onnxruntime_onnx", backend="onnxruntime",
                                    max_batch_size=max_batch_size)
            for entry in stage["inputs"]:
                _tensor(config.input.add(), entry, pb, batched=batched)
            for entry in stage["outputs"]:
                _tensor(config.output.add(), entry, pb, batched=batched)
            config.instance_group.add(kind=pb.ModelInstanceGroup.Kind.Value(kind), count=instance_count)
            if batched:
                config.dynamic_batching.SetInParent()
            if kind == "KIND_GPU":
                _tensorrt_accelerator(config, manifest)
            (tmp / model_name / "config.pbtxt").write_text(text_format.MessageToString(config))
            models.append(model_name)
        if not single:
            config = pb.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch_size)
            for entry in ios["inputs"]:
                _tensor(config.input.add(), entry, pb, batched=batched)
            for entry in ios["outputs"]:
                _tensor(config.output.add(), entry, pb, batched=batched)
            for i, stage in enumerate(stages):
                step = config.ensemble_scheduling.step.add(model_name=f"{name}_stage{i}", model_version=-1)
                for entry in stage["inputs"]:
                    step.input_map[entry["name"]] = entry["name"]
                for entry in stage["outputs"]:
                    # Internal tensors of the ensemble are named by the producing stage; outputs keep their names.
                    step.output_map[entry["name"]] = entry["name"]
            (tmp / name / "1").mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(text_format.MessageToString(config))
            models.append(name)

    atomic_write_dir(pathlib.Path(output), write, force=force)
    return {"repository": str(output), "models": models, "ensemble": None if single else name,
            "instance_kind": kind, "max_batch_size": max_batch_size, "batch_axis": axis if batched else None}


def validate_repository(path: str | os.PathLike) -> dict:
    """Parse every ``config.pbtxt`` with Triton's ModelConfig schema and check the repository is consistent.

    Checks: each config parses (unknown fields or bad enum values fail), its name is its
    folder, a numbered version folder exists, ONNX models' inputs/outputs match the config,
    and an ensemble's steps name models of the repository and read only tensors that are
    ensemble inputs or outputs of earlier steps, and produce every ensemble output.
    Raises ``BadInputError`` on the first problem; returns the parsed configs by name.
    """
    import onnx
    from google.protobuf import text_format

    pb = model_config_pb2()
    root = pathlib.Path(path)
    configs = {}
    for config_path in sorted(root.glob("*/config.pbtxt")):
        config = pb.ModelConfig()
        try:
            text_format.Parse(config_path.read_text(), config)
        except text_format.ParseError as e:
            raise BadInputError(f"{config_path}: not a valid Triton model config ({e})") from None
        folder = config_path.parent
        if config.name != folder.name:
            raise BadInputError(f"{config_path}: name '{config.name}' differs from its folder '{folder.name}'")
        if not any(p.is_dir() and p.name.isdigit() for p in folder.iterdir()):
            raise BadInputError(f"{folder}: no numbered version folder")
        if config.platform == "onnxruntime_onnx":
            model = onnx.load(str(folder / "1" / "model.onnx"), load_external_data=False)
            inits = {t.name for t in model.graph.initializer}
            inputs = [i.name for i in model.graph.input if i.name not in inits]
            outputs = [o.name for o in model.graph.output]
            if sorted(inputs) != sorted(i.name for i in config.input) or sorted(outputs) != sorted(o.name for o in config.output):
                raise BadInputError(f"{config_path}: inputs/outputs differ from the ONNX model's")
            ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*model.graph.input, *model.graph.output]
                     if v.type.tensor_type.HasField("shape")}
            for tensor in [*config.input, *config.output]:  # with batching, Triton's dims leave out the batch axis
                if tensor.name in ranks and len(tensor.dims) + (config.max_batch_size > 0) != ranks[tensor.name]:
                    raise BadInputError(f"{config_path}: '{tensor.name}' has {len(tensor.dims)} dims with max_batch_size "
                                        f"{config.max_batch_size}, but rank {ranks[tensor.name]} in the ONNX model")
        configs[config.name] = config
    if not configs:
        raise BadInputError(f"{root}: no config.pbtxt found")
    for config in configs.values():
        if config.platform != "ensemble":
            continue
        available = {i.name for i in config.input}
        for step in config.ensemble_scheduling.step:
            if step.model_name not in configs:
                raise BadInputError(f"ensemble {config.name}: step model '{step.model_name}' is not in the repository")
            if config.max_batch_size > configs[step.model_name].max_batch_size:
                raise BadInputError(f"ensemble {config.name}: max_batch_size {config.max_batch_size} exceeds "
                                    f"{step.model_name}'s {configs[step.model_name].max_batch_size}")
            model_inputs = {i.name for i in configs[step.model_name].input}
            model_outputs = {o.name for o in configs[step.model_name].output}
            for key, tensor in step.input_map.items():
                if key not in model_inputs:
                    raise BadInputError(f"ensemble {config.name}: '{key}' is not an input of {step.model_name}")
                if tensor not in available:
                    raise BadInputError(f"ensemble {config.name}: step {step.model_name} reads '{tensor}' before it is produced")
            if set(step.input_map) != model_inputs:
                raise BadInputError(f"ensemble {config.name}: step {step.model_name} leaves inputs unmapped")
            for key, tensor in step.output_map.items():
                if key not in model_outputs:
                    raise BadInputError(f"ensemble {config.name}: '{key}' is not an output of {step.model_name}")
                available.add(tensor)
        missing = [o.name for o in config.output if o.name not in available]
        if missing:
            raise BadInputError(f"ensemble {config.name}: outputs {missing} are produced by no step")
    return configs
