"""Compile-time support for decoders with a KV cache (``compile --task text-generation``).

:func:`prepare` finds the graph's cache convention (:mod:`tfgraph.deploy.kv_layout`; exit 2 naming what
was found when there is a cache it cannot identify, or none at all under ``--task
text-generation``), sizes the generated verification inputs consistently (the mask covers
``past_sequence + sequence``) and returns a :class:`GenerationCheck`, an instrument that verifies
generation itself: a left-padded prompt with an empty cache (past length 0), then decode steps of
one token each fed with the previous step's ``present`` tensors, all computed once on the input
model. Every pass that changes the graph is checked on every step (as the numeric-diff instrument
checks the single-run inputs), and the final model again under the target's own session. The
manifest's ``generation`` section records the layout (what :mod:`tfgraph.deploy.generate` feeds the
artifact from), the context length and these checks.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from tfgraph.errors import BadInputError, VerificationError, first_line
from tfgraph.compiler.instruments import Instrument
from tfgraph.compiler.sources import hf_files
from tfgraph.deploy.kv_layout import CacheLayout, detect, mask_positions
from tfgraph.ir import CONTEXT_KEY, GENERATION_TASK, TASK_KEY
from tfgraph.compiler.verify import (UNOPTIMIZED, compare, make_session, padded_positions, resolve_shapes, unoptimized,
                                     within_kernel_numerics)

TASKS = ("text-generation",)
#: Decode steps checked after the prompt.
DECODE_STEPS = 2


def _signature(values) -> list[tuple[str, tuple | None, str]]:
    out = []
    for v in values:
        shape = None if v.shape is None else tuple(d if isinstance(d, int) else (d.value or None) for d in v.shape)
        out.append((v.name, shape, v.dtype.numpy().name if v.dtype is not None else "?"))
    return out


def layout_of(model: ir.Model) -> CacheLayout | None:
    return detect(_signature(model.graph.inputs), _signature(model.graph.outputs))


def shares_cache_buffer(model: ir.Model, layout: CacheLayout) -> bool:
    """Whether one buffer per cache tensor can be bound as both past and present: every past input is
    read only as a com.microsoft.GroupQueryAttention's past_key/past_value (whose present output is the
    matching graph output) or by a Shape that leaves out the sequence axis, and an attention mask input
    (the kernels' lengths come from it, not from the past's length) exists."""
    if layout.attention_mask is None:
        return False
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name: v for v in graph.outputs}
    for past_pair, present_pair in zip(layout.past, layout.present):
        for index, (past, present) in enumerate(zip(past_pair, present_pair)):
            value = inputs.get(past)
            if value is None or not value.uses():
                return False
            for node, position in value.uses():
                if node.op_type == "Shape" and node.domain == "":
                    start = node.attributes.get_int("start", 0)
                    end = node.attributes.get_int("end", 4)
                    if (start < 0 or end < 0) or start <= 2 < end:
                        return False
                    continue
                if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" or position != 3 + index:
                    return False
                if outputs.get(present) is not node.outputs[1 + index]:
                    return False
    return True


def context_length(model: ir.Model, source: Mapping[str, Any]) -> int | None:
    """Positions the decoder can see: the checkpoint's ``max_position_embeddings`` (``n_positions``),
    a built-in model's table, or the rows of the graph's position table; None when unknown (RoPE graphs)."""
    folder = hf_files(source)
    if folder is not None:
        try:
            config = json.loads((pathlib.Path(folder) / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        for key in ("max_position_embeddings", "n_positions", "seq_length"):
            if isinstance(config.get(key), int):
                return int(config[key])
    if source.get("kind") == "builtin":
        from tfgraph.models import get_model

        return get_model(source["source"]).max_positions
    from tfgraph.compiler.verify import position_limit

    return position_limit(model)


def prepare(model: ir.Model, task: str | None, shapes: Mapping[str, Any] | None, source: Mapping[str, Any], *,
            seed: int = 0, verify: bool = True) -> GenerationCheck | None:
    """None without a task (the model compiles as one forward pass, whatever its inputs); else the
    check (see the module)."""
    if task is None:
        return None
    if task not in TASKS:
        raise BadInputError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    layout = layout_of(model)
    if layout is None:
        names = ", ".join(v.name for v in model.graph.inputs)
        raise BadInputError(f"--task text-generation: the model has no KV-cache inputs (inputs: {names}); export it "
                            "with past_key_values.N.key/.value inputs and present.N.key/.value outputs, or give a "
                            "Hugging Face folder")
    check = GenerationCheck(model, layout, dict(shapes or {}), context_length(model, source), seed=seed, verify=verify)
    check.source = dict(source)
    model.metadata_props[TASK_KEY] = GENERATION_TASK  # lower-cached-attention's condition
    if check.context:  # sizes the rotary tables of lower-cached-attention
        model.metadata_props[CONTEXT_KEY] = str(check.context)
    return check


class GenerationCheck(Instrument):
    """Verifies a prompt (past length 0) and decode steps after every modifying pass (see the module)."""

    def __init__(self, model: ir.Model, layout: CacheLayout, shapes: dict, context: int | None, *, seed: int,
                 verify: bool):
        self.layout = layout
        self.context = context
        self.shapes = _complete(model, layout, shapes)
        self.steps: list[tuple[str, dict, dict]] = []  # (label, feeds, reference outputs)
        self.atol = self.rtol = 0.0
        self.final: list[dict] = []
        self.source: dict = {}
        self.genai_config: str | None = None
        if verify:
            self._reference(model, seed)

    # --- references --------------------------------------------------------------------------
    def _reference(self, model: ir.Model, seed: int) -> None:
        layout = self.layout
        resolved = resolve_shapes(model, self.shapes, strict=False)
        batch, prompt = resolved[layout.input_ids]
        if self.context is not None:
            prompt = max(2, min(prompt, self.context - DECODE_STEPS))
        rng = np.random.default_rng(seed)
        vocab = layout.vocab_size or 2
        ids = rng.integers(0, vocab, size=(batch, prompt)).astype(np.int64)
        mask = np.ones((batch, prompt), np.int64)
        if layout.attention_mask is not None:
            for row in range(1, batch):  # left padding, as a batch of prompts of different lengths has
                mask[row, : min(prompt - 1, row * max(1, prompt // (2 * batch)))] = 0
        np_type = np.dtype(layout.dtype)
        past = {name: np.zeros((batch, layout.kv_heads, 0, layout.head_size), np_type)
                for pair in layout.past for name in pair}
        session = make_session(model, options=UNOPTIMIZED)
        feeds = self._feeds(ids, mask, past)
        for step in range(DECODE_STEPS + 1):
            outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
            label = "prompt (past 0)" if step == 0 else f"decode step {step} (past {mask.shape[1] - 1})"
            self.steps.append((label, feeds, outputs))
            next_ids = outputs[layout.logits][:, -1].argmax(-1).reshape(batch, 1).astype(np.int64)
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            past = {p: outputs[q] for pp, qq in zip(layout.past, layout.present) for p, q in zip(pp, qq)}
            feeds = self._feeds(next_ids, mask, past)

    def _feeds(self, ids: np.ndarray, mask: np.ndarray, past: dict) -> dict:
        layout = self.layout
        feeds = {layout.input_ids: ids, **past}
        if layout.attention_mask is not None:
            feeds[layout.attention_mask] = mask
        if layout.position_ids is not None:
            feeds[layout.position_ids] = mask_positions(mask, ids.shape[1])
        return feeds

    def tolerance(self, atol: float, rtol: float) -> GenerationCheck:
        self.atol, self.rtol = atol, rtol
        return self

    # --- instrument hooks --------------------------------------------------------------------------
    def _check(self, model: ir.Model, where: str, *, providers=("CPUExecutionProvider",), options=UNOPTIMIZED,
               pass_name: str | None = None) -> list[dict]:
        try:
            session = make_session(model, providers=providers, options=options)
            names = [o.name for o in session.get_outputs()]
            results = [dict(zip(names, session.run(None, feeds))) for _, feeds, _ in self.steps]
        except Exception as e:  # noqa: BLE001 - reported with the pass
            raise VerificationError(f"{where}: the model no longer runs the generation steps: {first_line(e)}",
                                    pass_name=pass_name) from None
        report = []
        for (label, feeds, expected), actual in zip(self.steps, results):
            actual = self._mask_padding(feeds, expected, actual)
            diffs = compare(expected, actual, atol=self.atol, rtol=self.rtol, padded=padded_positions(feeds))
            tokens = bool(np.array_equal(expected[self.layout.logits][:, -1].argmax(-1),
                                         actual[self.layout.logits][:, -1].argmax(-1)))
            report.append({"step": label, "past": int(next(iter(feeds[p] for p in self.layout.past[0])).shape[2]),
                           "sequence": int(feeds[self.layout.input_ids].shape[1]),
                           "max_abs": max((d.max_abs for d in diffs), default=0.0),
                           "next_tokens_equal": tokens, "passed": all(d.ok for d in diffs)})
            bad = [d for d in diffs if not d.ok]
            if bad:
                worst = max(bad, key=lambda d: d.max_abs)
                raise VerificationError(
                    f"{where}: {label}: output '{worst.name}' max abs error {worst.max_abs:.3g} exceeds "
                    f"atol={self.atol:g} rtol={self.rtol:g}", pass_name=pass_name, report={"generation": report})
        return report

    def _mask_padding(self, feeds: dict, expected: dict, actual: dict) -> dict:
        """Cache entries at padded key positions hold whatever the kernel computed for a query that sees
        no key (undefined; never attended to later): left out, as padded positions are in logits."""
        mask = feeds.get(self.layout.attention_mask) if self.layout.attention_mask else None
        if mask is None or mask.all():
            return actual
        padded = (np.asarray(mask) == 0)[:, None, :, None]
        out = dict(actual)
        for pair in self.layout.present:
            for name in pair:
                if name in out and out[name].shape == expected[name].shape and out[name].shape[2] == mask.shape[1]:
                    out[name] = np.where(padded, expected[name], out[name])
        return out

    def after_pass(self, pass_, record, model):
        if not self.steps or not record.modified:
            return
        if getattr(pass_, "changes_outputs", False):  # quantization/pruning: later passes are held to this model
            self._rebaseline(model)
            return
        if getattr(pass_, "changes_cache_layout", False):  # its cache is its own: checked on its own chain
            self._check_own_cache(model, f"after pass '{record.name}' (pass #{record.index + 1})", record.name)
            return
        self._check(model, f"after pass '{record.name}' (pass #{record.index + 1})", pass_name=record.name)

    def _check_own_cache(self, model: ir.Model, where: str, pass_name: str) -> None:
        """A pass that lays the cache out its own way (``changes_cache_layout``): the model runs the prompt and
        every decode step on the cache it wrote itself (the steps' ids and masks unchanged); its logits, at
        the real positions, must match the reference's; then its own feeds and outputs are the steps later
        passes are held to. The cache tensors are not compared (a different layout of the same keys)."""
        layout = self.layout
        try:
            session = make_session(model, options=UNOPTIMIZED)
            names = [o.name for o in session.get_outputs()]
            steps, past = [], None
            for label, feeds, _ in self.steps:
                feeds = dict(feeds) if past is None else {**feeds, **past}
                outputs = dict(zip(names, session.run(None, feeds)))
                steps.append((label, feeds, outputs))
                past = {p: outputs[q] for pp, qq in zip(layout.past, layout.present) for p, q in zip(pp, qq)}
        except Exception as e:  # noqa: BLE001 - reported with the pass
            raise VerificationError(f"{where}: the model no longer runs the generation steps on its own cache: "
                                    f"{first_line(e)}", pass_name=pass_name) from None
        logits = layout.logits
        for (label, feeds, expected), (_, _, actual) in zip(self.steps, steps):
            diffs = compare({logits: expected[logits]}, {logits: actual[logits]}, atol=self.atol, rtol=self.rtol,
                            padded=padded_positions(feeds))
            bad = [d for d in diffs if not d.ok]
            if bad:
                raise VerificationError(
                    f"{where}: {label} on its own cache: output '{logits}' max abs error {bad[0].max_abs:.3g} exceeds "
                    f"atol={self.atol:g} rtol={self.rtol:g}", pass_name=pass_name)
        self.steps = steps

    def _rebaseline(self, model: ir.Model) -> None:
        session = make_session(model, options=UNOPTIMIZED)
        names = [o.name for o in session.get_outputs()]
        self.steps = [(label, feeds, dict(zip(names, session.run(None, feeds)))) for label, feeds, _ in self.steps]

    def final_check(self, model: ir.Model, providers, options: Mapping[str, Any]) -> None:
        """The compiled model under the target's own session, on every step. Where it diverges, as the
        single-run final check does (``tfgraph.compiler.phases``): when the same prepacked kernels without
        graph optimization stay within the kernels' numerics of the reference and give what the optimized
        session gives, the difference is the kernels' (e.g. MatMulNBits' int8 compute), recorded, and the
        steps are checked against that run instead."""
        if not self.steps:
            return
        names = [getattr(p, "name", p) for p in providers]
        where = "the compiled model under the target's session"
        try:
            self.final = self._check(model, where, providers=names, options=options)
        except VerificationError as error:
            try:
                session = make_session(model, providers=names, options=unoptimized(options))
                outputs = [o.name for o in session.get_outputs()]
                kernels = [dict(zip(outputs, session.run(None, feeds))) for _, feeds, _ in self.steps]
            except Exception:  # noqa: BLE001 - the divergence stands
                raise error from None
            if not all(within_kernel_numerics(compare(want, self._mask_padding(feeds, want, got), atol=self.atol,
                                                      rtol=self.rtol, padded=padded_positions(feeds)))
                       for (_, feeds, want), got in zip(self.steps, kernels)):
                raise error from None  # too far from the reference to be another arithmetic's rounding
            steps, self.steps = self.steps, [(label, feeds, got) for (label, feeds, _), got in zip(self.steps, kernels)]
            try:
                self.final = self._check(model, where, providers=names, options=options)
            except VerificationError:
                raise error from None
            finally:
                self.steps = steps
            for entry in self.final:
                entry["against"] = "the same prepacked kernels without graph optimization (kernel numerics differ)"

    def compiled_layout(self, model: ir.Model) -> CacheLayout:
        """The layout of the compiled model (its names do not change), with whether it can share its cache buffers."""
        layout = layout_of(model) or self.layout
        return dataclasses.replace(layout, shared_buffer=shares_cache_buffer(model, layout))

    def files(self, model: ir.Model) -> dict[str, bytes]:
        """Files for the artifact: ``genai_config.json`` (onnxruntime-genai) when compiled from a Hugging Face
        folder (or an ``.onnx`` beside one's config.json) with the Optimum cache names (see :mod:`tfgraph.compiler.genai_config`)."""
        from tfgraph.compiler.genai_config import FILE, genai_config

        found = hf_files(self.source)
        if found is None:
            return {}
        folder = pathlib.Path(found)
        loaded = []
        for name in ("config.json", "generation_config.json"):
            try:
                loaded.append(json.loads((folder / name).read_text()) if (folder / name).is_file() else {})
            except (OSError, ValueError):
                loaded.append({})
        data = genai_config(self.compiled_layout(model), self.context, *loaded)
        self.genai_config = FILE if data is not None else None
        return {FILE: json.dumps(data, indent=2).encode()} if data is not None else {}

    def report(self, model: ir.Model) -> dict:
        layout = self.compiled_layout(model)
        return {
            "task": "text-generation",
            **layout.to_json(),
            "context_length": self.context,
            "genai_config": self.genai_config,
            "verification": {"steps": self.final, "passed": all(s["passed"] for s in self.final) if self.final else None,
                             "skipped": not self.steps},
        }


def _complete(model: ir.Model, layout: CacheLayout, shapes: dict) -> dict:
    """Give the mask's total-length dimension ``past_sequence + sequence`` unless the caller sized it,
    and the past an empty cache unless the caller sized it: the phases' checks run a prompt (the
    generation steps check the decode steps), since a cached layer lowered to GroupQueryAttention
    runs a multi-token chunk after a filled cache at batch 1 only (onnxruntime's CPU kernel)."""
    past_dim = layout.dims.get("past_sequence")
    if past_dim and past_dim not in shapes and not any(name in shapes for pair in layout.past for name in pair):
        shapes = {**shapes, past_dim: 0}
    total = layout.dims.get("total_sequence")
    if total is None or total in shapes or (layout.attention_mask or "") in shapes:
        return shapes
    given = {k: v for k, v in shapes.items() if k != total}
    resolved = resolve_shapes(model, given, strict=False)
    sequence = resolved[layout.input_ids][1]
    past = resolved[layout.past[0][0]][2]
    return {**shapes, total: int(sequence) + int(past)}
