"""Two-operand Einsum products of an attention block as Transpose + MatMul (+ Transpose).

LongT5's local attention and other blocks written with ``torch.einsum`` compute
``Q·Kᵀ`` and ``P·V`` as Einsums over (batch…, block, position, head, size) operands.
:func:`as_matmul` rewrites one such Einsum into standard ops that compute exactly the same
product, so :mod:`tfgraph.passes.attention_softmax` can read the block from its math: every
letter of the equation is either a batch letter (in both operands and the output), the one
contracted letter (in both operands, not in the output), or a free letter of one operand
(one per operand, in the output). A leading ``...`` is allowed when both operands have
the same rank.
"""

from __future__ import annotations

import onnx_ir as ir


def _terms(equation: str, ranks: list[int]) -> tuple[list[str], str] | None:
    equation = equation.replace(" ", "")
    if "->" not in equation:
        return None
    inputs, output = equation.split("->")
    parts = inputs.split(",")
    if len(parts) != 2:
        return None
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation]
    ellipsis = None
    for i, part in enumerate(parts):
        if "..." in part:
            if not part.startswith("..."):
                return None
            count = ranks[i] - (len(part) - 3)
            if ellipsis not in (None, count) or count < 0:
                return None
            ellipsis = count
    letters = "".join(spare[: ellipsis or 0])
    parts = [p.replace("...", letters) for p in parts]
    if "..." in output and not output.startswith("..."):
        return None
    output = output.replace("...", letters)
    if any(len(p) != r for p, r in zip(parts, ranks)):
        return None
    return parts, output


def as_matmul(graph: ir.Graph, node: ir.Node) -> bool:
    """Replace ``node`` (an Einsum) by Transposes around a MatMul when its equation is a batched
    matrix product; False (nothing changed) otherwise."""
    if node.op_type != "Einsum" or node.domain != "" or len(node.inputs) != 2:
        return False
    a, b = node.inputs
    if a is None or b is None or a.shape is None or b.shape is None:
        return False
    terms = _terms(node.attributes.get_string("equation", ""), [len(a.shape), len(b.shape)])
    if terms is None:
        return False
    (ta, tb), out = terms
    if len(set(ta)) != len(ta) or len(set(tb)) != len(tb) or len(set(out)) != len(out):
        return False
    batch = [c for c in out if c in ta and c in tb]
    contracted = [c for c in ta if c in tb and c not in out]
    m = [c for c in ta if c not in tb]
    n = [c for c in tb if c not in ta]
    if len(contracted) != 1 or len(m) != 1 or len(n) != 1 or m[0] not in out or n[0] not in out:
        return False
    if len(out) != len(batch) + 2:
        return False
    c, m, n = contracted[0], m[0], n[0]
    new: list[ir.Node] = []

    def arrange(value: ir.Value, term: str, order: list[str]) -> ir.Value:
        perm = [term.index(x) for x in order]
        if perm == list(range(len(perm))):
            return value
        t = ir.node("Transpose", [value], attributes={"perm": perm})
        new.append(t)
        if value.shape is not None:
            t.outputs[0].shape, t.outputs[0].type = ir.Shape([value.shape[p] for p in perm]), value.type
        return t.outputs[0]

    left = arrange(a, ta, batch + [m, c])
    right = arrange(b, tb, batch + [c, n])
    matmul = ir.node("MatMul", [left, right])
    new.append(matmul)
    product = matmul.outputs[0]
    if left.shape is not None and right.shape is not None:
        product.shape = ir.Shape([*left.shape[:-1], right.shape[-1]])
    product.type = node.outputs[0].type
    result = arrange(product, "".join(batch + [m, n]), list(out))
    old = node.outputs[0]
    result.shape, result.type = old.shape or result.shape, old.type
    ir.convenience.replace_nodes_and_values(graph, node, [node], new, [old], [result])
    return True
