"""cpu-int8 rewrites that keep the int8 kernels busy (issue 20): the packed attention as QAttention with
per-column weights and the key-padding mask as mask_index; outlier activation channels taken out of
run-time quantization (scaled into the weights, or a float path around the GELU FFN). Small hand-built
graphs: structure and numbers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from tfgraph.compiler import calibration as cal
from tfgraph.compiler import precision
from tfgraph.compiler.verify import run
from tfgraph.passes.quantize_attention import padding_mask_input
from tfgraph.passes.registry import create_pass
from tfgraph.targets.cpu import CPU_INT8, CPU_INT8_SCHEME

B, S, H, N, F = 2, 8, 32, 4, 64
QATTENTION = {**CPU_INT8_SCHEME.to_options(), "attention_kernel": "qattention"}


def _init(name, array, dtype=np.float32):
    array = np.asarray(array, dtype)
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                    const_value=ir.tensor(array, name=name))


def _out(node, name, dtype=ir.DataType.FLOAT, shape=None):
    node.outputs[0].name = name
    node.outputs[0].dtype = dtype
    if shape is not None:
        node.outputs[0].shape = ir.Shape(shape)
    return node.outputs[0]


def _attention_model(mask_kind: str = "padding", seed: int = 0) -> ir.Model:
    """x (B, S, H) -> packed com.microsoft.Attention(x, W, b, attention_bias) -> y; the bias is the
    HF padding mask ``(1 - mask) * -10000`` expanded to (B, 1, S, S) (``padding``), or a float graph
    input (``bias``: not a key-padding mask)."""
    rng = np.random.default_rng(seed)
    x = ir.Value(name="x", shape=ir.Shape(["batch", "seq", H]), type=ir.TensorType(ir.DataType.FLOAT))
    w = _init("W", rng.standard_normal((H, 3 * H)) * rng.uniform(0.05, 0.5, 3 * H))  # columns of different ranges
    b = _init("b", rng.standard_normal(3 * H) * 0.1)
    nodes, inputs = [], [x]
    if mask_kind == "padding":
        mask = ir.Value(name="attention_mask", shape=ir.Shape(["batch", "seq"]), type=ir.TensorType(ir.DataType.INT64))
        inputs.append(mask)
        cast = ir.node("Cast", [mask], attributes={"to": ir.DataType.FLOAT}, name="cast")
        inv = ir.node("Sub", [_init("one", 1.0), _out(cast, "mask_f")], name="inv")
        neg = ir.node("Mul", [_out(inv, "inv"), _init("big", -10000.0)], name="neg")
        unsq = ir.node("Unsqueeze", [_out(neg, "neg"), _init("axes", [1, 2], np.int64)], name="unsq")
        shape = ir.node("Shape", [x], attributes={"start": 1, "end": 2}, name="seq_len")
        full = ir.node("Concat", [_init("lead", [1, 1], np.int64),
                                  _out(shape, "seq_len", ir.DataType.INT64), _init("last", [1], np.int64)],
                       attributes={"axis": 0}, name="full")
        expand = ir.node("Expand", [_out(unsq, "unsq"), _out(full, "full", ir.DataType.INT64)], name="expand")
        bias = _out(expand, "bias")
        nodes += [cast, inv, neg, unsq, shape, full, expand]
    else:
        bias = ir.Value(name="bias", shape=ir.Shape(["batch", 1, "seq", "seq"]), type=ir.TensorType(ir.DataType.FLOAT))
        inputs.append(bias)
    att = ir.node("Attention", [x, w, b, None, None, bias], attributes={"num_heads": N}, domain="com.microsoft",
                  name="attention")
    y = _out(att, "y", shape=["batch", "seq", H])
    nodes.append(att)
    inits = [w, b] + [v for n in nodes for v in n.inputs if v is not None and v.const_value is not None and v not in (w, b)]
    graph = ir.Graph(inputs, [y], nodes=nodes, initializers=list(dict.fromkeys(inits)),
                     opset_imports={"": 17, "com.microsoft": 1}, name="attention")
    return ir.Model(graph, ir_version=8)


def _attention_feeds(seed=1):
    rng = np.random.default_rng(seed)
    mask = np.ones((B, S), np.int64)
    mask[0, 5:] = 0  # right padding
    mask[1, :2] = 0  # left padding
    return {"x": rng.standard_normal((B, S, H)).astype(np.float32), "attention_mask": mask}


def _cos(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_padding_mask_is_found_by_probes():
    model = _attention_model()
    bias = next(n for n in model.graph if n.op_type == "Attention").inputs[5]
    found = padding_mask_input(model, bias)
    assert found is not None and found.name == "attention_mask"


def test_packed_attention_becomes_qattention_with_per_column_weights_and_mask_index():
    model = _attention_model()
    feeds = _attention_feeds()
    want = run(_attention_model(), feeds)["y"]
    p = create_pass("quantize", **QATTENTION)
    assert p(model).modified
    ops = [n.op_type for n in model.graph]
    assert ops.count("QAttention") == 1 and ops.count("DynamicQuantizeLinear") == 1 and "MultiHeadAttention" not in ops
    qa = next(n for n in model.graph if n.op_type == "QAttention")
    w, scale = (qa.inputs[i].const_value.numpy() for i in (1, 4))
    assert w.dtype == np.int8 and scale.shape == (3 * H,)  # per column
    assert len(qa.inputs) < 8 or qa.inputs[7] is None  # symmetric: the all-zero zero point left out
    mask_index = qa.inputs[5]
    assert mask_index.dtype == ir.DataType.INT32 and mask_index.producer().inputs[0].name == "attention_mask"
    got = run(model, feeds)["y"]
    assert _cos(got, want) > 0.999
    # masked keys are really masked: what the padded positions hold does not matter to the others
    noisy = dict(feeds, x=feeds["x"].copy())
    noisy["x"][0, 5:] += 3.0
    again = run(model, noisy)["y"]
    assert _cos(again[0, :5], want[0, :5]) > 0.999  # fp32 rows 0..4 of batch 0 ignore keys 5..7
    assert p.report["attention"]["qattention"] == ["attention"]


def test_reverted_qattention_runs_as_float_attention_with_the_same_mask():
    model = _attention_model()
    feeds = _attention_feeds()
    p = create_pass("quantize", **QATTENTION)
    p(model)
    precision.revert_nodes(model, p.quantized, ["attention"])
    assert [n.op_type for n in model.graph if n.name == "attention"] == ["Attention"]
    np.testing.assert_allclose(run(model, feeds)["y"], run(_attention_model(), feeds)["y"], atol=1e-5)


def test_a_general_bias_keeps_multiheadattention():
    model = _attention_model("bias")
    p = create_pass("quantize", **QATTENTION)
    p(model)
    ops = [n.op_type for n in model.graph]
    assert "QAttention" not in ops and "MultiHeadAttention" in ops
    assert "not a key-padding mask" in p.report["attention"]["multiheadattention"]["attention"]


# --- outlier channels ----------------------------------------------------------------------------------


def _ffn(seed: int = 0) -> ir.Model:
    """x -> LayerNorm (gamma 30 on channel 3: an outlier channel) = l -> MatMul(W1) + b1 -> Gelu = h
    (hidden channel 5 large: b1[5] = 20) -> MatMul(W2) + b2 -> + l -> y."""
    rng = np.random.default_rng(seed)
    gamma = np.ones(H)
    gamma[3] = 30.0
    b1 = rng.standard_normal(F) * 0.1
    b1[5] = 20.0
    w1 = rng.standard_normal((H, F)) * 0.2
    w1[3] *= 0.05  # channel 3's size stays out of the hidden layer
    vals = {"gamma": gamma, "beta": np.zeros(H), "W1": w1, "b1": b1,
            "W2": rng.standard_normal((F, H)) * 0.2, "b2": rng.standard_normal(H) * 0.1}
    v = {k: _init(k, a) for k, a in vals.items()}
    x = ir.Value(name="x", shape=ir.Shape(["batch", S, H]), type=ir.TensorType(ir.DataType.FLOAT))
    ln = ir.node("LayerNormalization", [x, v["gamma"], v["beta"]], attributes={"axis": -1}, name="ln")
    mm1 = ir.node("MatMul", [_out(ln, "l"), v["W1"]], name="mm1")
    add1 = ir.node("Add", [_out(mm1, "m1"), v["b1"]], name="add1")
    gelu = ir.node("Gelu", [_out(add1, "a1")], domain="com.microsoft", name="gelu")
    mm2 = ir.node("MatMul", [_out(gelu, "h"), v["W2"]], name="mm2")
    add2 = ir.node("Add", [_out(mm2, "m2"), v["b2"]], name="add2")
    res = ir.node("Add", [_out(add2, "a2"), ln.outputs[0]], name="residual")
    y = _out(res, "y", shape=["batch", S, H])
    graph = ir.Graph([x], [y], nodes=[ln, mm1, add1, gelu, mm2, add2, res], initializers=list(v.values()),
                     opset_imports={"": 17, "com.microsoft": 1}, name="ffn")
    return ir.Model(graph, ir_version=8)


def _ffn_feeds(seed, batch=4):
    return {"x": np.random.default_rng(seed).standard_normal((batch, S, H)).astype(np.float32)}


def _quantized_ffn(outliers: bool):
    model = _ffn()
    q = create_pass("quantize", **CPU_INT8_SCHEME.to_options())
    q(model)
    p = None
    if outliers:
        calib = cal.CalibrationSet([_ffn_feeds(s) for s in (2, 3)], "test")
        p = create_pass("quantize-outlier-channels", ratio=6.0, max_channels=2, calibration=calib)
        assert p(model).modified
    return model, q, p


def test_outlier_channels_structure():
    model, _, p = _quantized_ffn(True)
    assert p.report["scaled"] == {"mm1": [3]} and p.report["split"] == {"mm2": [5]}
    nodes = {n.name: n for n in model.graph}
    # mm1 reads the LayerNorm output scaled down on channel 3 (the residual still reads it unscaled)
    mul = nodes["mm1"].inputs[0].producer()
    assert mul.op_type == "Mul" and mul.inputs[0].name == "l"
    inv = mul.inputs[1].const_value.numpy()
    assert inv[3] < 0.2 and np.all(np.delete(inv, 3) == 1.0)
    assert nodes["residual"].inputs[1].name == "l" or nodes["residual"].inputs[0].name == "l"
    # hidden channel 5: off in both integer GEMMs (Gelu(-100) = 0), computed by a float path instead
    assert not nodes["mm1"].inputs[1].const_value.numpy()[:, 5].any()
    assert nodes["mm1"].inputs[4].const_value.numpy()[5] == -100.0
    assert not nodes["mm2"].inputs[1].const_value.numpy()[5].any()
    assert {"mm2_outlier_mm1", "mm2_outlier_gelu", "mm2_outlier_mm2", "mm2_outlier_sum"} <= set(nodes)
    assert model.graph.outputs[0].name == "y"


def test_outlier_channels_make_int8_accurate():
    want = run(_ffn(), _ffn_feeds(7))["y"]
    plain, _, _ = _quantized_ffn(False)
    fixed, _, _ = _quantized_ffn(True)
    err_plain = np.abs(run(plain, _ffn_feeds(7))["y"] - want).max()
    err_fixed = np.abs(run(fixed, _ffn_feeds(7))["y"] - want).max()
    assert err_fixed < err_plain / 3
    assert _cos(run(fixed, _ffn_feeds(7))["y"], want) > 0.9999


@pytest.mark.parametrize("names", [["mm2"], ["mm1"], ["mm1", "mm2"], ["mm2", "mm1"]])
def test_reverting_split_gemms_stays_exact(names):
    """max-drop may revert either GEMM of a split FFN, in any order: the float path is kept or dropped
    consistently (the outlier pass's record for mm2 overrides quantize's)."""
    model, q, p = _quantized_ffn(True)
    records = {**q.quantized, **p.quantized}
    precision.revert_nodes(model, records, names)
    want = run(_ffn(), _ffn_feeds(7))["y"]
    got = run(model, _ffn_feeds(7))["y"]
    assert _cos(got, want) > 0.9999
    if names == ["mm1", "mm2"] or names == ["mm2", "mm1"]:
        np.testing.assert_allclose(got, want, atol=0.1)  # the outlier pass rebuilds from int8 levels (|y| ~ 20)


def test_cpu_int8_profile_runs_both_rewrites():
    specs = [s for ph in CPU_INT8.phases if ph.name == "precision" for s in ph.passes]
    assert [s.name for s in specs] == ["quantize", "quantize-outlier-channels"]
    assert dict(specs[0].options)["attention_kernel"] == "qattention"


# --- max-drop ranking in one pass ------------------------------------------------------------------------


def test_max_drop_ranks_every_revert_in_one_session():
    """The FFN with its outlier weight (tests/test_precision.py's budget model): the switch model scores
    each single-node revert like one session per node does, and the budget loop reverts mm2 first."""
    from tests.test_precision import _budget_setup, _feeds

    model, records, evaluate = _budget_setup()
    sessions = []

    def evaluate_configs(m, configs):
        sessions.append(1)
        return [evaluate_with(m, extra) for extra in configs]

    def evaluate_with(m, extra):
        from tfgraph.compiler.precision import accuracy
        from tests.test_precision import _mlp

        return accuracy(run(_mlp(outlier=True), _feeds()), run(m, {**_feeds(), **extra}))

    switched, switches = precision._copy(model), {}
    precision.revert_nodes(switched, records, list(records), switches=switches)
    assert sorted(switches) == ["mm1", "mm2"] and len(switched.graph.inputs) == 3
    # every switch on: the quantized model; one off: that node reverted alone
    on = {s: np.array(1.0, np.float32) for s in switches.values()}
    np.testing.assert_allclose(run(switched, {**_feeds(), **on})["y"], run(model, _feeds())["y"], atol=1e-6)
    alone = precision._copy(model)
    precision.revert_nodes(alone, records, ["mm2"])
    np.testing.assert_allclose(run(switched, {**_feeds(), **on, switches["mm2"]: np.array(0.0, np.float32)})["y"],
                               run(alone, _feeds())["y"], atol=1e-6)
    report = precision.budget(model, records, evaluate, 1e-4, evaluate_configs=evaluate_configs)
    assert report["met"] and report["reverted"][0] == "mm2" and "one session" in report["ranking"]
    assert len(sessions) == 1


def _specialized_qattention_model():
    model = _attention_model()
    create_pass("quantize", **QATTENTION)(model)
    return model


def test_unpadded_batches_skip_the_mask_and_padded_ones_keep_it():
    """specialize-unpadded-attention: QAttention → If(min(mask) > 0, QAttention without mask_index, with it);
    both branches read the same outer weights; outputs equal the unspecialized kernel's on unpadded and
    padded batches (padded keys still ignored)."""
    reference = _specialized_qattention_model()
    model = _specialized_qattention_model()
    p = create_pass("specialize-unpadded-attention")
    assert p(model).modified and p.report == {"specialized": 1, "masks": 1, "skipped": {}}
    choose = next(n for n in model.graph if n.op_type == "If")
    assert "QAttention" not in [n.op_type for n in model.graph]
    then, other = (choose.attributes[k].value for k in ("then_branch", "else_branch"))
    (unmasked,), (masked,) = list(then), list(other)
    assert unmasked.op_type == masked.op_type == "QAttention"
    assert (len(unmasked.inputs) <= 5 or unmasked.inputs[5] is None) and masked.inputs[5] is not None
    assert unmasked.inputs[1] is masked.inputs[1] and unmasked.inputs[1].is_initializer()  # one weight, outer scope
    condition = choose.inputs[0].producer()
    assert condition.op_type == "Greater" and condition.inputs[0].producer().op_type == "ReduceMin"
    padded = _attention_feeds()
    unpadded = dict(padded, attention_mask=np.ones((B, S), np.int64))
    for feeds in (unpadded, padded):
        np.testing.assert_allclose(run(model, feeds)["y"], run(reference, feeds)["y"], atol=1e-6)
    # and the padded batch really went through the mask: without it, its padded keys would be attended to
    unmasked_run = run(reference, dict(padded, attention_mask=np.ones((B, S), np.int64)))["y"]
    assert np.abs(run(model, padded)["y"][0] - unmasked_run[0]).max() > 1e-2


def test_masks_the_pass_cannot_read_as_key_padding_are_left_alone():
    """A float attention bias (the fp32 Attention's input 5) is not one of the 2-D integer masks; an
    attention whose mask is 1-D (end positions) neither."""
    model = _attention_model()
    p = create_pass("specialize-unpadded-attention")
    assert not p(model).modified and p.report["specialized"] == 0
    model = _specialized_qattention_model()
    qa = next(n for n in model.graph if n.op_type == "QAttention")
    lengths = ir.Value(name="lengths", shape=ir.Shape(["batch"]), type=ir.TensorType(ir.DataType.INT32))
    model.graph.inputs.append(lengths)
    qa.replace_input_with(5, lengths)
    p = create_pass("specialize-unpadded-attention")
    assert not p(model).modified and p.report["skipped"] == {"mask not 2-D (batch, total)": 1}


def test_cpu_int8_specializes_after_the_budget():
    """The If hides QAttention from the max-drop loop's reverts: cpu-int8 runs it in finalize, after the budget."""
    names = [(spec.phase, spec.name) for spec in CPU_INT8.passes]
    assert ("finalize", "specialize-unpadded-attention") in names
    assert names.index(("finalize", "specialize-unpadded-attention")) > max(
        i for i, (phase, _) in enumerate(names) if phase == "precision")
