"""Writing, registering and running a custom tfgraph pass.

The pass below removes pairs of ``Transpose`` nodes that cancel each other
(``Transpose(perm=p)`` followed by ``Transpose(perm=q)`` with ``q ∘ p`` the identity),
a pattern exporters leave behind around attention reshapes.

Run it as a script to compile a small model with it::

    python examples/custom_pass.py

or load it into the CLI as a plugin and name the pass::

    tfgraph compile model.onnx -o out --plugin examples/custom_pass.py --pass cancel-transposes
"""

from __future__ import annotations

import sys
import tempfile

import onnx_ir as ir

import tfgraph


@tfgraph.register_pass("cancel-transposes")
class CancelTransposesPass(tfgraph.Pass):
    """Remove Transpose pairs whose permutations compose to the identity."""

    def __init__(self, *, max_rounds: int = 4):
        # Options are keyword-only, so a target or `--pass cancel-transposes:max_rounds=2` can set them.
        super().__init__()
        self.max_rounds = max_rounds

    def call(self, model: ir.Model) -> tfgraph.PassResult:
        modified = False
        for _ in range(self.max_rounds):
            changed = False
            for graph in model.graphs():
                for second in list(graph):
                    if second.op_type != "Transpose" or second.domain != "":
                        continue
                    first = second.inputs[0].producer() if second.inputs[0] is not None else None
                    if first is None or first.op_type != "Transpose" or first.domain != "":
                        continue
                    p = first.attributes.get_ints("perm")
                    q = second.attributes.get_ints("perm")
                    if p is None or q is None or [p[i] for i in q] != list(range(len(p))):
                        continue
                    # second(first(x)) == x: consumers of second's output read x directly.
                    ir.convenience.replace_all_uses_with(second.outputs[0], first.inputs[0])
                    if second.outputs[0].is_graph_output():
                        continue  # keep the graph output's name: leave this pair in place
                    graph.remove(second, safe=True)
                    if not first.outputs[0].uses() and not first.outputs[0].is_graph_output():
                        graph.remove(first, safe=True)
                    changed = True
            modified |= changed
            if not changed:
                break
        return tfgraph.PassResult(model, modified)


def _demo_model() -> ir.Model:
    """x → Transpose(0,2,1) → Transpose(0,2,1) → Relu → y."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 4, 8]))
    t1 = ir.node("Transpose", [x], attributes={"perm": [0, 2, 1]})
    t2 = ir.node("Transpose", [t1.outputs[0]], attributes={"perm": [0, 2, 1]})
    relu = ir.node("Relu", [t2.outputs[0]])
    y = relu.outputs[0]
    y.name, y.dtype, y.shape = "y", ir.DataType.FLOAT, ir.Shape(["batch", 4, 8])
    graph = ir.Graph([x], [y], nodes=[t1, t2, relu], opset_imports={"": 18}, name="demo")
    return ir.Model(graph, ir_version=10)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        artifact = tfgraph.compile(_demo_model(), target="cpu-fp32", extra_passes=["cancel-transposes"], output=f"{tmp}/out")
        record = next(r for r in artifact.manifest["passes"] if r["name"] == "cancel-transposes")
        print(
            f"cancel-transposes: modified={record['modified']} nodes {record['nodes_before']} -> {record['nodes_after']}; "
            f"verified={artifact.verified}"
        )
        session = tfgraph.load(f"{tmp}/out")
        print("artifact runs:", [o.name for o in session.get_outputs()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
