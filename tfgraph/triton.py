"""Export an artifact as a Triton Inference Server model repository (onnxruntime backend).

One model per stage (``<name>_stage<i>/1/model.onnx`` + ``config.pbtxt``) and an ensemble
``<name>`` that chains them (``platform: "ensemble"``); a single-model artifact gives one
model. Configs are built as Triton ``ModelConfig`` protobuf messages from the schema that
the ``tritonclient`` package ships (``model_config_pb2``) and written with protobuf's text
format, so :func:`validate_repository` can parse them back with the same schema.
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


def _tensor(message, entry: dict, pb) -> None:
    message.name = entry["name"]
    dtype = _TYPES.get(entry["dtype"])
    if dtype is None:
        raise BadInputError(f"tensor '{entry['name']}' has dtype {entry['dtype']}, which has no Triton type")
    message.data_type = pb.DataType.Value(dtype)
    shape = entry["shape"]
    message.dims.extend([d if isinstance(d, int) else -1 for d in shape] if shape is not None else [-1])


def _model_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text) or "model"


def export_triton(artifact: str | os.PathLike, output: str | os.PathLike, *, name: str | None = None,
                  force: bool = False, instance_count: int = 1) -> dict:
    """Write the repository atomically; returns a description (models, files)."""
    from google.protobuf import text_format

    from tfgraph.artifact import MODEL_FILE, atomic_write_dir, read_manifest

    pb = model_config_pb2()
    src = pathlib.Path(artifact)
    manifest = read_manifest(src)
    name = _model_name(name or src.resolve().name)
    pipe = manifest.get("pipeline")
    if pipe is None:
        from tfgraph import ir as tir

        model = tir.load(src / MODEL_FILE).model
        from tfgraph.stages import _describe

        stages = [{"file": MODEL_FILE, "inputs": [_describe(v, None) for v in model.graph.inputs],
                   "outputs": [_describe(v, None) for v in model.graph.outputs]}]
        ios = {"inputs": stages[0]["inputs"], "outputs": stages[0]["outputs"]}
    else:
        stages = pipe["stages"]
        ios = pipe
    single = len(stages) == 1
    models = []

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
            config = pb.ModelConfig(name=model_name, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=0)
            for entry in stage["inputs"]:
                _tensor(config.input.add(), entry, pb)
            for entry in stage["outputs"]:
                _tensor(config.output.add(), entry, pb)
            config.instance_group.add(kind=pb.ModelInstanceGroup.Kind.Value("KIND_CPU"), count=instance_count)
            (tmp / model_name / "config.pbtxt").write_text(text_format.MessageToString(config))
            models.append(model_name)
        if not single:
            config = pb.ModelConfig(name=name, platform="ensemble", max_batch_size=0)
            for entry in ios["inputs"]:
                _tensor(config.input.add(), entry, pb)
            for entry in ios["outputs"]:
                _tensor(config.output.add(), entry, pb)
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
    return {"repository": str(output), "models": models, "ensemble": None if single else name}


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
