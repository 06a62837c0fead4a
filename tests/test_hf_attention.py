"""Hugging Face models exported with SDPA and eager attention, with both exporters.

Tiny seeded checkpoints come from :func:`tfgraph.models.hf_configs.make_hf_checkpoint`.
Every (kind, attention, exporter) export is run in onnxruntime at a shape other
than the traced one and compared to the torch model; the SDPA and eager exports
must differ in structure, which proves ``attention=`` reaches transformers.

The dynamo exporter needs 7-16 s per tiny model on two CPU cores (torch.export
tracing and decompositions, not the model size); the full matrix of bert, albert,
gpt2, llama and mistral runs in about 2.5 minutes.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("transformers", reason="needs the 'hf' extra")

from tfgraph.errors import BadInputError  # noqa: E402
from tfgraph.compiler.export import export  # noqa: E402
from tfgraph.models import ATTENTION_IMPLEMENTATIONS, DEFAULT_ATTENTION, get_model, hf_model, list_models  # noqa: E402
from tfgraph.models.hf_configs import HF_KINDS, make_hf_checkpoint  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"

KINDS = ("bert", "albert", "gpt2", "llama", "mistral")
ATTENTIONS = ("eager", "sdpa")
EXPORTERS = ("torchscript", "dynamo")
TOLERANCE = 1e-4
CAUSAL = {"gpt2", "llama", "mistral"}


def _matrix():
    for kind in KINDS:
        for attention in ATTENTIONS:
            for exporter in EXPORTERS:
                marks = [pytest.mark.slow] if exporter == "dynamo" else []
                yield pytest.param(kind, attention, exporter, id=f"{kind}-{attention}-{exporter}", marks=marks)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-kinds")
    return {kind: make_hf_checkpoint(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="module")
def exported(onnx_export):
    """``exported(kind, attention, exporter)``: the exported file, made once per test session (conftest's
    ``onnx_export``, from the same seeded checkpoints; tests/test_gpu_lowering.py compiles the same exports)."""

    def get(kind: str, attention: str, exporter: str):
        return onnx_export(kind, exporter, attention)

    return get


def run_onnx(path, spec, inputs) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(spec.input_names)
    return session.run(None, {name: value.numpy() for name, value in zip(spec.input_names, inputs)})[0]


def run_torch(module, inputs) -> np.ndarray:
    with torch.no_grad():
        return module(*inputs).numpy()


def max_abs(got: np.ndarray, want: np.ndarray, where: np.ndarray | None = None) -> float:
    assert got.shape == want.shape
    difference = np.abs(got - want)
    return float((difference[where] if where is not None else difference).max())


def histogram(path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


# --- every kind x attention x exporter against torch ----------------------------------------


@pytest.mark.parametrize("kind, attention, exporter", list(_matrix()))
def test_export_matches_torch(checkpoints, exported, kind, attention, exporter):
    spec = hf_model(checkpoints[kind], attention=attention)
    assert spec.attention == attention
    path = exported(kind, attention, exporter)
    graph = onnx.load(str(path)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in list(graph.input) + list(graph.output)}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims[spec.output_names[0]][:2] == ["batch", "sequence"]
    module = spec.build()
    assert module.model.config._attn_implementation == attention

    # Traced at batch 2 x seq 16; run at 3 x 9 with the last quarter of row 1 padded (right padding).
    inputs = spec.example_inputs(3, 9)
    assert int(inputs[spec.input_names.index("attention_mask")].min()) == 0
    difference = max_abs(run_onnx(path, spec, inputs), run_torch(module, inputs))
    assert difference <= TOLERANCE, f"padded batch: max abs difference {difference}"

    if kind in CAUSAL:
        ids, mask = inputs
        # No padding at all: the mask is purely causal.
        ones = (ids, torch.ones_like(mask))
        difference = max_abs(run_onnx(path, spec, ones), run_torch(module, ones))
        assert difference <= TOLERANCE, f"all-ones mask: max abs difference {difference}"
        # Left padding: the pad queries see no key at all (fully masked rows). Torch gives
        # them zeros under SDPA; the dynamo export uses float32.min instead of -inf, so its
        # NaN guard never fires and they get an average instead. Only real tokens are compared.
        left = torch.ones_like(mask)
        left[0, :3] = 0
        real = left.numpy().astype(bool)
        difference = max_abs(run_onnx(path, spec, (ids, left)), run_torch(module, (ids, left)), real)
        assert difference <= TOLERANCE, f"left padding: max abs difference {difference}"


# --- the option reaches transformers ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_sdpa_and_eager_exports_differ(exported, kind, exporter):
    eager, sdpa = histogram(exported(kind, "eager", exporter)), histogram(exported(kind, "sdpa", exporter))
    layers = 2
    assert eager != sdpa
    # Both keep one Softmax per layer between two MatMuls ...
    assert eager["Softmax"] == sdpa["Softmax"] == layers
    # ... but only SDPA guards it against fully masked rows: Where(IsNaN(softmax), 0, softmax).
    assert eager["IsNaN"] == 0 and sdpa["IsNaN"] == layers
    # SDPA scales Q and K each by head_dim ** -0.25; eager scales the scores once by head_dim ** -0.5.
    head_dim = 8
    assert has_scalar(exported(kind, "sdpa", exporter), head_dim**-0.25)
    assert not has_scalar(exported(kind, "eager", exporter), head_dim**-0.25)
    assert has_scalar(exported(kind, "eager", exporter), head_dim**-0.5)


def has_scalar(path, value: float) -> bool:
    """Whether the graph holds a float32 scalar constant (initializer or Constant node) equal to ``value``."""
    graph = onnx.load(str(path)).graph
    tensors = list(graph.initializer) + [
        node.attribute[0].t for node in graph.node if node.op_type == "Constant" and node.attribute[0].name == "value"
    ]
    for tensor in tensors:
        array = onnx.numpy_helper.to_array(tensor)
        if array.size == 1 and array.dtype == np.float32 and abs(float(array.ravel()[0]) - value) < 1e-6:
            return True
    return False


# --- the API ----------------------------------------------------------------------------------


def test_attention_constants():
    assert ATTENTION_IMPLEMENTATIONS == ("sdpa", "eager")
    assert DEFAULT_ATTENTION == "sdpa"


def test_hf_default_attention_is_sdpa(checkpoints):
    spec = hf_model(checkpoints["bert"])
    assert spec.attention == "sdpa" and "sdpa attention" in spec.description
    assert spec.build().model.config._attn_implementation == "sdpa"
    assert hf_model(checkpoints["gpt2"], attention="eager").build().model.config._attn_implementation == "eager"
    assert get_model("minilm").attention == "sdpa"
    assert get_model("minilm", attention="eager").attention == "eager"


def test_reference_models_have_one_attention_form(tmp_path):
    for name in list_models():
        if name != "minilm":
            assert get_model(name).attention == "eager"
            assert get_model(name, attention="eager").attention == "eager"
    with pytest.raises(BadInputError, match=r"bert-small is a reference model with one attention form") as info:
        get_model("bert-small", attention="sdpa")
    assert "\n" not in str(info.value)
    with pytest.raises(BadInputError, match=r"gpt-small-kv is a reference model with one attention form"):
        export("gpt-small-kv", tmp_path / "x.onnx", attention="sdpa")
    assert list(tmp_path.iterdir()) == []


def test_unknown_attention(checkpoints, tmp_path):
    message = r"unknown attention implementation 'flash'; choose one of: sdpa, eager"
    with pytest.raises(BadInputError, match=message):
        get_model("bert-small", attention="flash")
    with pytest.raises(BadInputError, match=message):
        get_model("minilm", attention="flash")
    with pytest.raises(BadInputError, match=message):
        hf_model(checkpoints["bert"], attention="flash")
    with pytest.raises(BadInputError, match=message):
        export(checkpoints["bert"], tmp_path / "x.onnx", attention="flash")
    with pytest.raises(BadInputError, match=message):
        export("gpt-small", tmp_path / "x.onnx", attention="flash")
    assert list(tmp_path.iterdir()) == []


def test_registry_with_attention_does_not_import_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from tfgraph.models import list_models, get_model\n"
        "specs = [get_model(n, 'eager') for n in list_models()] + [get_model('minilm', 'sdpa')]\n"
        "assert [s.attention for s in specs][-2:] == ['eager', 'sdpa']\n"
        "import tfgraph.models.hf_configs\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- the tiny checkpoints ---------------------------------------------------------------------


def test_checkpoint_kinds(checkpoints, tmp_path):
    import transformers

    # GPT-Neo's local layers: tests/test_windowed_attention.py; Qwen2, Phi: tests/test_gpu_lowering.py
    assert tuple(HF_KINDS) == KINDS + ("gpt_neo", "qwen2", "phi")
    # Deterministic: a second build writes the same weights.
    again = make_hf_checkpoint("llama", tmp_path / "llama")
    assert (again / "model.safetensors").read_bytes() == (checkpoints["llama"] / "model.safetensors").read_bytes()
    assert sorted(p.name for p in checkpoints["bert"].iterdir()) == ["config.json", "model.safetensors"]

    llama = transformers.AutoConfig.from_pretrained(str(checkpoints["llama"]))
    assert (llama.num_attention_heads, llama.num_key_value_heads) == (4, 2)
    assert llama.architectures == ["LlamaForCausalLM"]
    mistral = transformers.AutoConfig.from_pretrained(str(checkpoints["mistral"]))
    assert mistral.sliding_window == 8 and mistral.num_key_value_heads == 2
    gpt2 = hf_model(checkpoints["gpt2"]).build().model
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    for kind in KINDS:
        spec = hf_model(checkpoints[kind])
        assert spec.vocab_size == 128
        assert spec.output_names == (("logits",) if kind in CAUSAL else ("last_hidden_state",))
        assert spec.input_names == (("input_ids", "attention_mask") if kind in CAUSAL else ("input_ids", "attention_mask", "token_type_ids"))
    with pytest.raises(BadInputError, match="unknown Hugging Face test model kind 't5'"):
        make_hf_checkpoint("t5", tmp_path / "t5")


def test_mistral_window_is_active(checkpoints):
    """With a window of 8 and 2 layers, token 0 reaches at most 16 positions further."""
    spec = hf_model(checkpoints["mistral"])
    module = spec.build()
    ids, _ = spec.example_inputs(1, 24)
    mask = torch.ones_like(ids)
    changed = ids.clone()
    changed[0, 0] = (changed[0, 0] + 1) % spec.vocab_size
    before, after = run_torch(module, (ids, mask)), run_torch(module, (changed, mask))
    assert np.abs(before[0, 9] - after[0, 9]).max() > 1e-4
    np.testing.assert_allclose(before[0, 17:], after[0, 17:], atol=1e-6)
