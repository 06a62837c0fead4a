"""Inference mode: training-mode ``Dropout`` becomes the identity.

A model exported while in training mode (``model.train()``, or ``training=TrainingMode.TRAINING``)
keeps ``Dropout`` nodes whose ``training_mode`` input is true: every run drops a different random
set of activations, so its outputs are random and no rewrite can be verified against it. The
compiler refuses such an input and names the nodes; this pass, asked for with
``--pass eval-mode``, runs on the input model before verification takes its reference.
"""

from __future__ import annotations

import onnx_ir as ir

from tfgraph.passes.registry import register_pass

RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"})


def _training_dropout(node: ir.Node) -> bool:
    """A Dropout that drops at run time: its ``training_mode`` input is present and not a constant false."""
    if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
        return False
    mode = node.inputs[2]
    if mode is None:
        return False
    value = ir.convenience.get_const_tensor(mode)
    return value is None or bool(value.numpy().reshape(-1)[0])


def random_nodes(model: ir.Model) -> list[ir.Node]:
    """Nodes whose outputs are random at run time: training-mode Dropout and the Random* ops."""
    return [
        node for node in model.graph.all_nodes()
        if _training_dropout(node) or (node.domain in ("", "ai.onnx") and node.op_type in RANDOM_OPS)
    ]


@register_pass("eval-mode")
class EvalModePass(ir.passes.InPlacePass):
    """Training-mode Dropout → identity (its mask output, if used, → all true): the model as it runs
    in inference. Applied to the input model before verification (it changes the outputs on purpose).
    Random* ops are left alone: they are part of what the model computes."""

    applies_to_input = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph.all_nodes()):
            if not _training_dropout(node):
                continue
            graph = node.graph
            data, output = node.inputs[0], node.outputs[0]
            new_nodes = [ir.node("Identity", [data], num_outputs=1)]
            replacements = [(output, new_nodes[0].outputs[0])]
            if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
                shape = ir.node("Shape", [data], num_outputs=1)
                ones = ir.node("ConstantOfShape", [shape.outputs[0]], num_outputs=1,
                               attributes={"value": ir.tensor([True], dtype=ir.DataType.BOOL)})
                new_nodes += [shape, ones]
                replacements.append((node.outputs[1], ones.outputs[0]))
            graph.insert_before(node, new_nodes)
            for old, new in replacements:
                name = old.name
                old.name = None
                new.name, new.type, new.shape = name, old.type, old.shape
                ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)
