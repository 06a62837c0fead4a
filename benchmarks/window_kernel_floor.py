"""How fast can the blocked windowed form be on onnxruntime's CPU kernels? The tile kernel alone.

    python benchmarks/window_kernel_floor.py                 # S = 8192, batch 1, 20 rounds (~3 min)
    python benchmarks/window_kernel_floor.py --batch 1 4 --blocks 64 128

The blocked form's cost is its tile kernel (MultiHeadAttention over (tiles, block) queries
against (tiles, N, width, H) keys and values, one shared (block, width) band bias, the
key padding mask) plus the data movement that builds its inputs. This times the kernel
alone on inputs already in that layout — no Gather, no mask building, nothing but the one
op — interleaved with the dense reference (GroupQueryAttention causal on the (B, S, N·H)
tensors: the best dense fused op on CPU) and with tfgraph's full lowering, so
``GQA ÷ kernel`` is the most any lowering built on this kernel can reach on this machine.
Also timed: GroupQueryAttention run tile by tile with past keys (batch 1: its CPU kernel
rejects more than one sequence with past context), the other fused kernel a tile could use.

One attention layer, 12 heads × 64, causal window of 256 keys, fp32, 2 intra-op threads.
Results: ``benchmarks/results/window_kernel_floor.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import time

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import bench_window  # noqa: E402
import harness  # noqa: E402 - benchmarks/harness.py

HEADS, HEAD_SIZE, WINDOW = bench_window.HEADS, bench_window.HEAD_SIZE, bench_window.WINDOW
HIDDEN = HEADS * HEAD_SIZE
RESULTS = pathlib.Path(__file__).parent / "results"
_MASKED = bench_window.blocked._HALF_MIN  # the lowering's masked-score value


def _model(nodes: list[ir.Node], inputs: list[ir.Value], output: ir.Value) -> bytes:
    output.name = "y"
    graph = ir.Graph(inputs, [output], nodes=nodes, opset_imports={"": 18, "com.microsoft": 1})
    return ir.serde.serialize_model(ir.Model(graph, ir_version=9)).SerializeToString()


def _input(name: str, shape: list[int], dtype=ir.DataType.FLOAT) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))


def tile_kernel(tiles: int, block: int, key_mask: bool = True) -> tuple[bytes, dict[str, np.ndarray]]:
    """MultiHeadAttention on pre-built tiles, exactly the inputs the lowering gives it
    (``key_mask=False``: without the key padding mask, the least the kernel can be given)."""
    before = -(-(WINDOW - 1) // block)
    width = (before + 1) * block
    offset = np.arange(width)[None, :] - before * block - np.arange(block)[:, None]
    band = np.where((offset >= -(WINDOW - 1)) & (offset <= 0), 0.0, _MASKED).astype(np.float32)
    q = _input("q", [tiles, block, HIDDEN])
    k, v = (_input(n, [tiles, HEADS, width, HEAD_SIZE]) for n in "kv")
    mask = _input("m", [tiles, width], ir.DataType.INT32)
    bias = ir.node("Constant", [], attributes={"value": ir.tensor(band.reshape(1, 1, block, width))})
    node = ir.node("MultiHeadAttention", [q, k, v, None, mask if key_mask else None, bias.outputs[0]],
                   domain="com.microsoft",
                   attributes={"num_heads": HEADS, "scale": HEAD_SIZE ** -0.5, "mask_filter_value": _MASKED})
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((tiles, block, HIDDEN), np.float32),
             "k": rng.standard_normal((tiles, HEADS, width, HEAD_SIZE), np.float32),
             "v": rng.standard_normal((tiles, HEADS, width, HEAD_SIZE), np.float32),
             "m": np.ones((tiles, width), np.int32)}
    if not key_mask:
        del feeds["m"]
    return _model([bias, node], [q, k, v] + ([mask] if key_mask else []), node.outputs[0]), feeds


def gqa_tile(block: int) -> tuple[bytes, dict[str, np.ndarray]]:
    """One tile through GroupQueryAttention: ``block`` new queries and keys after
    ``before·block`` past keys (BNSH), the window as ``local_window_size``."""
    past = -(-(WINDOW - 1) // block) * block
    q, k, v = (_input(n, [1, block, HIDDEN]) for n in "qkv")
    pk, pv = (_input(n, [1, HEADS, past, HEAD_SIZE]) for n in ("pk", "pv"))
    seqlens = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([past + block - 1], np.int32))})
    total = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(past + block, np.int32))})
    node = ir.node("GroupQueryAttention", [q, k, v, pk, pv, seqlens.outputs[0], total.outputs[0]],
                   domain="com.microsoft", num_outputs=3,
                   attributes={"num_heads": HEADS, "kv_num_heads": HEADS, "scale": HEAD_SIZE ** -0.5,
                               "local_window_size": WINDOW})
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((1, block, HIDDEN), np.float32) for n in "qkv"}
    feeds.update({n: rng.standard_normal((1, HEADS, past, HEAD_SIZE), np.float32) for n in ("pk", "pv")})
    return _model([seqlens, total, node], [q, k, v, pk, pv], node.outputs[0]), feeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--blocks", type=int, nargs="+", default=[128])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "window_kernel_floor"))
    args = parser.parse_args()
    started = time.time()
    rows = []
    for batch in args.batch:
        dense = bench_window.feeds(batch, args.seq)
        runs = {"GQA causal (dense reference)": (bench_window.build("GQA causal (no window)"), dense, 1),
                "tfgraph cpu-fp32 (full lowering)": (bench_window.build("tfgraph cpu-fp32"), dense, 1)}
        for block in args.blocks:
            tiles = batch * -(-args.seq // block)
            runs[f"MHA tile kernel alone, block {block}"] = (*tile_kernel(tiles, block), 1)
            runs[f"MHA tile kernel alone, no key mask, block {block}"] = (*tile_kernel(tiles, block, False), 1)
            if batch == 1:
                model, feeds = gqa_tile(block)
                runs[f"GQA with past, tile by tile, block {block}"] = (model, feeds, tiles)
        sessions = {name: harness.session(data, args.threads) for name, (data, _, _) in runs.items()}
        names = list(runs)

        def once(session, feeds, repeat):
            for _ in range(repeat):
                session.run(None, feeds)

        times = harness.interleave({name: (lambda s=sessions[name], r=runs[name]: once(s, r[1], r[2])) for name in names},
                                   args.rounds, warmup=1)
        reference = harness.median(times[names[0]])
        for name in names:
            median = harness.median(times[name])
            rows.append({"batch": batch, "seq": args.seq, "variant": name, "median_ms": median * 1e3,
                         "dense_over_this": reference / median})
            print(f"B={batch} {name}: {median * 1e3:.1f} ms, GQA causal ÷ this = {reference / median:.2f}", flush=True)
        del sessions
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "onnxruntime": ort.__version__, "threads": args.threads, "rounds": args.rounds,
            "minutes": (time.time() - started) / 60, "load_average": [round(x, 2) for x in os.getloadavg()],
            "machine": harness.machine(),
            "arguments": " ".join(sys.argv[1:])}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# The blocked form's tile kernel alone vs the best dense fused op (CPU)", "",
             f"- date: {meta['date']}; onnxruntime {meta['onnxruntime']}; {args.threads} intra-op threads; "
             f"{args.rounds} interleaved rounds after a warm-up; medians; load average at the end "
             f"{', '.join(map(str, meta['load_average']))}",
             f"- one layer, {HEADS} heads × {HEAD_SIZE}, causal window {WINDOW}, S = {args.seq}, fp32",
             f"- machine: {meta['machine']['cpu']}, {meta['machine']['usable_cores']} usable cores, ISA "
             f"{'/'.join(meta['machine']['isa']) or '?'}",
             f"- reproduce: `{' '.join(['python benchmarks/window_kernel_floor.py'] + sys.argv[1:])}`",
             "- *GQA ÷ this*: how many times faster than GroupQueryAttention causal on the dense sequence",
             "", "| batch | variant | median ms | GQA ÷ this |", "|---:|---|---:|---:|"]
    lines += [f"| {r['batch']} | {r['variant']} | {r['median_ms']:.1f} | {r['dense_over_this']:.2f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.md/.json in {meta['minutes']:.1f} min")


if __name__ == "__main__":
    main()
