"""Precision: calibrators vs numpy references, QDQ placement per scheme (target data), the
max-drop revert loop, float16 conversion of a large-negative mask, int8 MiniLM accuracy."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from tfgraph.compiler import calibration as cal
from tfgraph.compiler import precision
from tfgraph.passes.quantize import quantize_array
from tfgraph.passes.registry import create_pass
from tfgraph.targets.cpu import CPU_INT8_SCHEME
from tfgraph.targets.cuda import TENSORRT_INT8_SCHEME as TENSORRT_LIKE_INT8
from tfgraph.targets.npu import NPU_A8W8
from tfgraph.compiler.verify import run

# --- calibrators -------------------------------------------------------------------------------


def _data(seed=0, n=20000):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    x[:5] = [9.0, -7.5, 12.0, 6.0, -11.0]  # outliers
    return x


def test_minmax_streamed_equals_numpy():
    x = _data()
    c = cal.MinMax()
    for part in np.array_split(x, 7):
        c.update(part)
    assert c.range() == (float(x.min()), float(x.max()))


@pytest.mark.parametrize("p", [99.0, 99.9])
def test_percentile_matches_numpy_within_a_bin(p):
    x = _data(1)
    one = cal.Percentile(p, bins=2048)
    one.update(x)
    width = 2 * one.edge / one.bins
    lo, hi = one.range()
    assert abs(lo - np.percentile(x, 100 - p, method="inverted_cdf")) <= 2 * width
    assert abs(hi - np.percentile(x, p, method="inverted_cdf")) <= 2 * width
    # Streamed in batches whose range grows (small values first): the histogram re-bins.
    streamed = cal.Percentile(p, bins=2048)
    for part in np.array_split(np.sort(np.abs(x)) * np.sign(x[: len(x)]), 5):
        streamed.update(part)
    y = np.sort(np.abs(x)) * np.sign(x)
    width = 2 * streamed.edge / streamed.bins
    lo, hi = streamed.range()
    assert abs(hi - np.percentile(y, p, method="inverted_cdf")) <= 2 * width
    assert abs(lo - np.percentile(y, 100 - p, method="inverted_cdf")) <= 2 * width


def _kl_reference(hist: np.ndarray, levels: int) -> int:
    """Plain-loop KL threshold search (independent of calibration.kl_threshold's vectorized form)."""
    best, best_i = None, len(hist)
    for i in range(levels, len(hist) + 1):
        p = [float(c) for c in hist[:i]]
        p[-1] += float(hist[i:].sum())
        q = [0.0] * i
        for g in range(levels):
            members = [j for j in range(i) if (j * levels) // i == g]
            total = sum(float(hist[j]) for j in members)
            nz = [j for j in members if p[j] > 0]
            for j in nz:
                q[j] = total / len(nz)
        sp, sq = sum(p), sum(q)
        kl = 0.0
        for pj, qj in zip(p, q):
            if pj > 0:
                kl += pj / sp * np.log((pj / sp) / max(qj / sq, 1e-12))
        if best is None or kl < best:
            best, best_i = kl, i
    return best_i


def test_entropy_matches_reference():
    x = _data(2, 5000)
    bins, levels = 256, 32
    c = cal.Entropy(bins=bins, quant_levels=levels)
    c.update(x)
    hist, _ = np.histogram(np.abs(x), bins=bins // 2, range=(0, c.edge))
    i = _kl_reference(hist, levels)
    lo, hi = c.range()
    assert abs(hi - i / (bins // 2) * c.edge) <= 2 * c.edge / bins + 1e-6
    assert hi < float(np.abs(x).max())  # the outliers are clipped
    assert lo == pytest.approx(-hi, abs=2 * c.edge / bins) or lo == float(x.min())


def test_quantize_array_per_channel_error_bound():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32) * np.arange(1, 9, dtype=np.float32)
    q, scale, zero = quantize_array(w, "int8", True, 1)
    assert q.dtype == np.int8 and scale.shape == (8,) and (zero == 0).all()
    assert np.abs((q.astype(np.float32) - zero) * scale - w).max() <= scale.max() / 2 + 1e-6
    q, scale, zero = quantize_array(w, "uint8", False, None)
    assert q.dtype == np.uint8 and scale.shape == () and 0 < int(zero) < 255
    np.testing.assert_allclose((q.astype(np.float32) - float(zero)) * scale, w, atol=float(scale) / 2 + 1e-6)


def test_calibration_set_hash_and_text(tmp_path):
    model = _mlp()
    a = cal.load_calibration({"x": np.ones((4, 3, 8), np.float32)}, model, batch_size=2)
    b = cal.load_calibration({"x": np.ones((4, 3, 8), np.float32)}, model, batch_size=2)
    c = cal.load_calibration({"x": np.zeros((4, 3, 8), np.float32)}, model, batch_size=2)
    assert len(a.batches) == 2 and a.sha256 == b.sha256 != c.sha256
    with pytest.warns(UserWarning, match="generated"):
        g = cal.load_calibration(None, model)
    assert g.source == "generated"
    ranges = cal.collect_ranges(model, ["h", "y"], a, chunk=1)
    ref = run(_with_outputs(model, ["h"]), a.batches[0])
    assert ranges["h"][0] == pytest.approx(float(ref["h"].min()), rel=1e-5)


# --- a small model -----------------------------------------------------------------------------


def _mlp(seed: int = 0, outlier: bool = False) -> ir.Model:
    """x -> MatMul(W1) -> Add(b1) = h -> LayerNorm -> MatMul(W2) -> Add(residual h) -> Softmax = y."""
    rng = np.random.default_rng(seed)

    def init(name, array):
        return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                        const_value=ir.tensor(array.astype(np.float32), name=name))

    w1 = rng.standard_normal((8, 16)) * 0.5
    w2 = rng.standard_normal((16, 16)) * 0.3
    if outlier:
        w2[0, 0] = 40.0  # per-tensor quantization of W2 loses every other weight
    values = {n: init(n, a) for n, a in {"W1": w1, "b1": rng.standard_normal(16) * 0.1, "W2": w2,
                                         "gamma": np.ones(16), "beta": np.zeros(16)}.items()}
    x = ir.Value(name="x", shape=ir.Shape(["batch", 3, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    mm1 = ir.node("MatMul", [x, values["W1"]], name="mm1")
    add1 = ir.node("Add", [mm1.outputs[0], values["b1"]], name="add1")
    ln = ir.node("LayerNormalization", [add1.outputs[0], values["gamma"], values["beta"]], attributes={"axis": -1}, name="ln")
    mm2 = ir.node("MatMul", [ln.outputs[0], values["W2"]], name="mm2")
    res = ir.node("Add", [mm2.outputs[0], add1.outputs[0]], name="residual")
    sm = ir.node("Softmax", [res.outputs[0]], attributes={"axis": -1}, name="softmax")
    nodes = [mm1, add1, ln, mm2, res, sm]
    for node, name in zip(nodes, ("m1", "h", "l", "m2", "r", "y")):
        node.outputs[0].name = name
        node.outputs[0].dtype = ir.DataType.FLOAT
        node.outputs[0].shape = ir.Shape(["batch", 3, 16])
    graph = ir.Graph([x], [sm.outputs[0]], nodes=nodes, initializers=list(values.values()), opset_imports={"": 17}, name="mlp")
    return ir.Model(graph, ir_version=8)


def _with_outputs(model: ir.Model, names):
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    values = {o.name: o for n in copy.graph for o in n.outputs}
    for name in names:
        copy.graph.outputs.append(values[name])
    return copy


def _feeds(seed=1, batch=4):
    return {"x": np.random.default_rng(seed).standard_normal((batch, 3, 8)).astype(np.float32)}


def _dq_inputs(model: ir.Model):
    """(consumer op, input index) -> the DequantizeLinear feeding it."""
    out = {}
    for node in model.graph:
        for i, v in enumerate(node.inputs):
            if v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear":
                out[(node.name, i)] = v.producer()
    return out


# --- QDQ structure per scheme ------------------------------------------------------------------


def test_cpu_int8_scheme_dynamic_structure():
    model = _mlp()
    # reduce_range: on CPUs without VNNI (this AVX2 EPYC), full-range s8 weights saturate the int16
    # pair sums of u8 x s8 kernels on this small model (cosine 0.963 measured); 7-bit weights do not.
    p = create_pass("quantize", **{**CPU_INT8_SCHEME.to_options(), "reduce_range": True})
    assert p(model).modified
    ops = [n.op_type for n in model.graph]
    assert ops.count("DynamicQuantizeMatMul") == 2 and "MatMul" not in ops
    for node in model.graph:
        if node.op_type == "DynamicQuantizeMatMul":
            b, scale = (node.inputs[i].const_value.numpy() for i in (1, 2))
            assert b.dtype == np.int8 and scale.shape == (b.shape[1],) and node.inputs[3] is None  # symmetric (zero point 0, left out), per column
    # mm1's bias Add folded into the kernel; LayerNorm, Softmax and the residual Add untouched and float
    assert [n.op_type for n in model.graph if n.op_type in ("LayerNormalization", "Softmax", "Add")] == [
        "LayerNormalization", "Add", "Softmax"]
    fp32 = run(_mlp(), _feeds())
    got = run(model, _feeds())
    assert precision.accuracy(fp32, got)["y"]["cosine"] > 0.999


def test_tensorrt_like_scheme_static_symmetric_per_channel():
    model = _mlp()
    calib = cal.load_calibration(_feeds(2, 8), model)
    p = create_pass("quantize", **TENSORRT_LIKE_INT8.to_options(), calibration=calib)
    p(model)
    dq = _dq_inputs(model)
    assert set(dq) == {("mm1", 0), ("mm1", 1), ("mm2", 0), ("mm2", 1)}  # MatMul inputs only
    for (consumer, index), node in dq.items():
        q, scale, zero = node.inputs
        if index == 1:  # weight: int8, symmetric, per output column (axis 1)
            assert node.attributes.get_int("axis") == 1
            assert q.const_value.dtype == ir.DataType.INT8 and scale.const_value.numpy().shape == (16,)
            assert not zero.const_value.numpy().any()
        else:  # activation: QuantizeLinear -> DequantizeLinear, int8 symmetric
            assert q.producer().op_type == "QuantizeLinear"
            assert zero.const_value.dtype == ir.DataType.INT8 and int(zero.const_value.numpy()) == 0
    for node in model.graph:
        if node.op_type in ("LayerNormalization", "Softmax", "Add"):
            assert all(v.producer() is None or v.producer().op_type != "DequantizeLinear" for v in node.inputs if v)
    out = run(model, _feeds())
    assert precision.accuracy(run(_mlp(), _feeds()), out)["y"]["cosine"] > 0.99


def test_npu_a8w8_scheme_uint8_asymmetric_per_tensor_and_override():
    model = _mlp()
    calib = cal.load_calibration(_feeds(2, 8), model)
    p = create_pass("quantize", **NPU_A8W8.to_options(), calibration=calib, exclude_nodes=["mm2"])
    p(model)
    dq = _dq_inputs(model)
    assert set(dq) == {("mm1", 0), ("mm1", 1)}  # mm2 excluded by the per-node override
    weight = dq[("mm1", 1)]
    assert "axis" not in weight.attributes and weight.inputs[1].const_value.numpy().shape == ()
    assert weight.inputs[0].const_value.dtype == ir.DataType.UINT8
    act = dq[("mm1", 0)]
    assert act.inputs[2].const_value.dtype == ir.DataType.UINT8
    assert 0 < int(act.inputs[2].const_value.numpy()) < 255  # asymmetric: calibrated zero point
    assert p.report["excluded_by_option"] == ["mm2"]


# --- max-drop ----------------------------------------------------------------------------------


def _budget_setup(outlier=True):
    model = _mlp(outlier=outlier)
    fp32 = run(_mlp(outlier=outlier), _feeds())
    p = create_pass("quantize", mode="dynamic", per_channel=False, weight_type="int8", placement={"MatMul": [0, 1]})
    p(model)

    def evaluate(m):
        return precision.accuracy(fp32, run(m, _feeds()))

    return model, p.quantized, evaluate


def test_max_drop_reverts_the_harmful_node_first():
    model, records, evaluate = _budget_setup()
    start = precision.score(evaluate(model))
    assert start < 0.999  # the outlier weight makes per-tensor W2 quantization harmful
    report = precision.budget(model, records, evaluate, 1e-4)
    assert report["met"] and report["reverted"][0] == "mm2"
    assert [n.op_type for n in model.graph if n.name == "mm2"] == ["MatMul"]
    assert report["final_score"] > start
    assert precision.score(evaluate(model)) >= 1 - 1e-4


def test_max_drop_zero_reverts_everything_to_float():
    model, records, evaluate = _budget_setup(outlier=False)
    report = precision.budget(model, records, evaluate, 0.0)
    assert sorted(report["reverted"]) == ["mm1", "mm2"]
    assert not any(n.op_type == "DynamicQuantizeMatMul" for n in model.graph)
    np.testing.assert_allclose(run(model, _feeds())["y"], run(_mlp(), _feeds())["y"], atol=1e-6)


# --- float16 -----------------------------------------------------------------------------------

F32_MIN = float(np.finfo(np.float32).min)


def _masked_attention(seed: int = 0) -> ir.Model:
    """One attention head with an HF-style additive mask ``(1 - mask) * finfo(float32).min``, behind
    a projection whose output (~1e5) overflows float16 before a LayerNorm brings it back."""
    rng = np.random.default_rng(seed)

    def init(name, array, dtype=np.float32):
        array = np.asarray(array, dtype=dtype)
        return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                        const_value=ir.tensor(array, name=name))

    c = {k: init(k, v) for k, v in {
        "Wbig": rng.standard_normal((16, 16)) * 3e4, "gamma": np.ones(16), "beta": np.zeros(16),
        "Wq": rng.standard_normal((16, 16)) * 0.3, "Wk": rng.standard_normal((16, 16)) * 0.3,
        "Wv": rng.standard_normal((16, 16)) * 0.3, "one": 1.0, "minval": F32_MIN, "scale": 0.25}.items()}
    c["axes"] = init("axes", [1], np.int64)
    x = ir.Value(name="x", shape=ir.Shape(["batch", "seq", 16]), type=ir.TensorType(ir.DataType.FLOAT))
    mask = ir.Value(name="mask", shape=ir.Shape(["batch", "seq"]), type=ir.TensorType(ir.DataType.INT64))
    nodes = []

    def op(op_type, inputs, name, dtype=ir.DataType.FLOAT, **attrs):
        node = ir.node(op_type, inputs, attributes=attrs or None, name=name)
        node.outputs[0].name = name + "_out"
        node.outputs[0].dtype = dtype
        nodes.append(node)
        return node.outputs[0]

    big = op("MatMul", [x, c["Wbig"]], "big")
    h = op("LayerNormalization", [big, c["gamma"], c["beta"]], "ln", axis=-1)
    q, k, v = (op("MatMul", [h, c[w]], w.lower()) for w in ("Wq", "Wk", "Wv"))
    kt = op("Transpose", [k], "kt", perm=[0, 2, 1])
    scores = op("Mul", [op("MatMul", [q, kt], "qk"), c["scale"]], "scaled")
    maskf = op("Cast", [mask], "mask_float", to=ir.DataType.FLOAT)
    bias = op("Mul", [op("Sub", [c["one"], maskf], "inverted"), c["minval"]], "mask_bias")
    probs = op("Softmax", [op("Add", [scores, op("Unsqueeze", [bias, c["axes"]], "bias_3d")], "masked")], "softmax", axis=-1)
    y = op("MatMul", [probs, v], "context")
    nodes[-1].outputs[0].name = "y"
    y.shape = ir.Shape(["batch", "seq", 16])
    graph = ir.Graph([x, mask], [y], nodes=nodes, initializers=list(c.values()), opset_imports={"": 17}, name="attention")
    return ir.Model(graph, ir_version=8)


def _attention_feeds(seed=3, batch=3, seq=6):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return {"x": rng.standard_normal((batch, seq, 16)).astype(np.float32), "mask": mask}


def test_float16_large_negative_mask_has_no_nan_or_inf():
    feeds = _attention_feeds()
    fp32 = run(_masked_attention(), feeds)["y"]
    assert np.isfinite(fp32).all()
    model = _masked_attention()
    p = create_pass("convert-float16", calibration={"x": feeds["x"], "mask": feeds["mask"]})
    assert p(model).modified
    y = run(model, feeds)["y"]
    assert y.dtype == np.float32 and np.isfinite(y).all()  # IO types kept
    np.testing.assert_allclose(y, fp32, atol=2e-2)
    kept = {k["node"]: k["reason"] for k in p.report["kept_float32"]}
    assert "big" in kept and "beyond" in kept["big"]  # ~1e5 overflows float16
    assert "softmax" in kept and "Softmax input range" in kept["softmax"]  # masked scores
    assert p.report["clamped_constants"][0]["initializer"] == "minval"
    half = [n.name for n in model.graph if any(o.dtype == ir.DataType.FLOAT16 for o in n.outputs)]
    assert {"wq", "wk", "wv", "qk", "context"} <= set(half)


def test_float16_without_the_range_rules_overflows():
    """The negative control: with the range rules off, the ~1e5 projection is typed float16, where a
    real float16 kernel overflows (onnxruntime CPU computes MatMul in float32 behind inserted Casts
    and hides it, hence the numpy check of what a float16 result holds)."""
    feeds = _attention_feeds()
    model = _masked_attention()
    p = create_pass("convert-float16", calibration=feeds, overflow_fraction=1e9, sensitive_max=float("inf"))
    p(model)
    assert p.report["kept_float32"] == []
    big = next(n for n in model.graph if n.name == "big")
    assert big.outputs[0].dtype == ir.DataType.FLOAT16
    w = next(v for v in _masked_attention().graph.initializers.values() if v.name == "Wbig").const_value.numpy()
    with np.errstate(over="ignore"):
        assert not np.isfinite((feeds["x"] @ w).astype(np.float16)).all()


def test_compile_float16_target_defined_here_reports_kept_nodes():
    import tfgraph
    from tfgraph.passes.registry import PassSpec
    from tfgraph.targets import Provider, Target, Tolerance
    from tfgraph.targets.profile import phases

    target = Target(name="test-fp16", description="convert-float16 only (a test profile)",
                    providers=(Provider("CPUExecutionProvider"),), precision="fp16",
                    phases=phases(rewrite=(PassSpec("convert-float16"), PassSpec("remove-dead"))), tolerance=Tolerance(5e-2, 5e-2),
                    min_cosine=0.999)
    feeds = _attention_feeds()
    artifact = tfgraph.compile(_masked_attention(), target, inputs=feeds, calibration=feeds)
    section = artifact.manifest["precision"]
    from tests._checks import assert_matches_source

    assert_matches_source(artifact, _masked_attention(), feeds=feeds)
    assert section["accuracy_vs_fp32"]["y"]["finite"] and section["accuracy_vs_fp32"]["y"]["cosine"] > 0.999
    kept = section["passes"][0]["kept_float32"]
    assert all(k["reason"] for k in kept) and {"big", "softmax"} <= {k["node"] for k in kept}
    assert section["calibration"]["sha256"] and section["calibration"]["source"] == "in-memory"


def test_cli_compile_cpu_int8_max_drop(cli, mlp_path, tmp_path):
    import json

    out = tmp_path / "int8"
    result = cli("compile", mlp_path, "-t", "cpu-int8", "-o", out, "--max-drop", "0", "--shape", "batch=4", "--json")
    assert result.code == 0, result.err
    manifest = json.loads(result.out)
    section = manifest["precision"]
    assert section["calibration"]["source"] == "generated" and any("generated" in w for w in manifest["warnings"])
    budget = section["max_drop"]
    # A zero budget reverts every quantized node; cpu-int8 reverts to float compute on float16-stored
    # weights, so even then the budget is not met exactly, and the manifest says so.
    assert budget["max_drop"] == 0.0 and sorted(budget["reverted"]) == sorted(section["passes"][0]["nodes"])
    assert not budget["met"] and any("budget not met" in w for w in manifest["warnings"])
    assert 0.9999 < budget["final_score"] < 1.0
    compiled = ir.load(out / "model.onnx")
    ops = [n.op_type for n in compiled.graph]
    assert "DynamicQuantizeMatMul" not in ops and ops.count("MatMul") >= 2
    assert all(n.inputs[1].producer().op_type == "Cast" for n in compiled.graph if n.op_type == "MatMul")


def test_max_drop_revert_with_float16_weights():
    model, records, evaluate = _budget_setup()
    report = precision.budget(model, records, evaluate, 1e-4, weights_float16=True)
    assert report["met"] and report["reverted"][0] == "mm2"
    mm2 = next(n for n in model.graph if n.name == "mm2")
    assert mm2.op_type == "MatMul"
    cast = mm2.inputs[1].producer()
    assert cast.op_type == "Cast" and cast.inputs[0].const_value.dtype == ir.DataType.FLOAT16
    assert "W2" not in model.graph.initializers  # the float32 weight is not stored


def test_float16_keeps_nodes_whose_constants_underflow():
    model = _mlp()
    ln = next(n for n in model.graph if n.name == "ln")
    tiny = ir.Value(name="tiny", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT),
                    const_value=ir.tensor(np.array(1e-12, np.float32), name="tiny"))
    model.graph.register_initializer(tiny)
    add = ir.node("Add", [ln.outputs[0], tiny], name="add_eps")
    add.outputs[0].dtype = ir.DataType.FLOAT
    add.outputs[0].shape = ln.outputs[0].shape
    model.graph.insert_after(ln, add)
    mm2 = next(n for n in model.graph if n.name == "mm2")
    mm2.replace_input_with(0, add.outputs[0])
    p = create_pass("convert-float16", calibration=_feeds())
    p(model)
    kept = {k["node"]: k["reason"] for k in p.report["kept_float32"]}
    assert "underflow to 0" in kept["add_eps"]
    assert np.isfinite(run(model, _feeds())["y"]).all()


def test_calibration_fits_pinned_input_shapes():
    """A static-shape target's graph takes only its pinned batch/sequence: calibration rows are regrouped
    into batches of the pinned size and padded (zeros: pad token, masked) or truncated to the length."""
    from onnx import TensorProto, helper

    from tfgraph.compiler.calibration import load_calibration

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["y"], to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    short = np.arange(1, 16, dtype=np.int64).reshape(3, 5)
    calib = load_calibration({"input_ids": short}, model, static=True)
    assert [b["input_ids"].shape for b in calib.batches] == [(1, 8)] * 3
    np.testing.assert_array_equal(calib.batches[1]["input_ids"][0], [6, 7, 8, 9, 10, 0, 0, 0])
    long = np.arange(24, dtype=np.int64).reshape(2, 12)
    calib = load_calibration({"input_ids": long}, model, static=True)
    np.testing.assert_array_equal(calib.batches[1]["input_ids"][0], np.arange(12, 20))
    with pytest.raises(Exception, match="expects|shape"):
        load_calibration({"input_ids": short}, model)  # without fitting, the shapes are refused


def test_next_token_agreement_and_kl_on_known_logits():
    """Teacher-forced next-token report of a causal LM's logits: top-1 agreement and mean KL over the
    positions the attention mask keeps (a padded position is not counted)."""
    want = np.zeros((1, 3, 4))
    want[0, :, 0] = 2.0  # fp32 predicts token 0 everywhere
    got = want.copy()
    got[0, 1] = [0.0, 3.0, 0.0, 0.0]  # position 1 now predicts token 1
    report = precision.next_token({"logits": want}, {"logits": got}, np.array([[1, 1, 1]]))
    p = np.exp(want[0, 1]) / np.exp(want[0, 1]).sum()
    q = np.exp(got[0, 1]) / np.exp(got[0, 1]).sum()
    assert report["positions"] == 3 and report["top1_agreement"] == pytest.approx(2 / 3)
    assert report["kl_mean"] == pytest.approx(float((p * np.log(p / q)).sum()) / 3)
    padded = precision.next_token({"logits": want}, {"logits": got}, np.array([[1, 0, 1]]))
    assert padded == {"top1_agreement": 1.0, "kl_mean": pytest.approx(0.0), "positions": 2}
    assert precision.next_token({"y": want}, {"y": got}) is None  # not a causal LM's logits
