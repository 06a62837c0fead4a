"""Generation from a decoder artifact (``compile --task text-generation``): run-time side, no compiler imports.

:func:`load_generator` opens the artifact with its target's providers and session options and reads
the manifest's ``generation`` section (the KV-cache layout, :mod:`tfgraph.deploy.kv_layout`) and the
``generation_config.json`` the artifact carries (eos/pad token ids). :meth:`Generator.generate`
runs the prompt once with an empty cache (past length 0) and then one token per step, the cache
kept between steps as onnxruntime values through IO binding: each step's ``present`` tensors are
bound as the next step's ``past`` inputs, never copied through numpy (only the last position's
logits come back to the host). When the layout says the graph reads its cache only through
kernels that append in place (``shared_buffer``: GroupQueryAttention with lengths from the mask),
each cache tensor is one (batch, kv_heads, prompt + new tokens, head_size) buffer bound as both past
and present, as onnxruntime-genai does for its builder's models: nothing is copied or rebound per
step but the mask (one token longer each step); on the host the new ids are written into the array
their bound value reads.

Batches are left-padded (``attention_mask`` rows of 0s then 1s), as transformers generates: the
graph computes position ids from the mask, so a padded row generates what it would alone. Greedy
decoding picks the arg-max; sampling applies temperature, top-k and top-p (in transformers' order)
and draws from a ``numpy`` generator seeded with ``seed``, so a seed reproduces its tokens. A row
that produces ``eos_token_id`` is finished: it continues with the pad token, and generation stops
when every row has finished.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from tfgraph.errors import BadInputError
from tfgraph.deploy.kv_layout import CacheLayout, mask_positions

GENERATION_CONFIG = "generation_config.json"


def load_generator(path: str | pathlib.Path, *, threads: int | None = None, spin: bool = True,
                   huge_pages: bool = True) -> Generator:
    """The :class:`Generator` of a decoder artifact; BadInputError (exit 2) for any other artifact.
    ``threads``: onnxruntime's intra-op threads (default: its own choice, one per core). ``spin``:
    idle pool threads busy-wait for the next operator (onnxruntime's default); False: they sleep
    (:data:`NO_SPINNING`), better when the cores are oversubscribed. ``huge_pages``: the memory the
    session mapped while loading (its weights) is moved onto 2 MiB pages where Linux allows it
    (:mod:`tfgraph.deploy.huge_pages`; the bytes moved in :attr:`Generator.huge_page_bytes`)."""
    return Generator(path, threads=threads, spin=spin, huge_pages=huge_pages)


#: Session config of a generator's session with ``spin=False``: its pool threads sleep between operators
#: instead of busy-waiting. Measured on a shared 2-core machine, 2 threads, cpu-int4 small Llama decode
#: b1 (benchmarks/bench_decoder.py, interleaved): at load ~4-5 sleeping 1.34 ms/token vs spinning 2.77;
#: at load ~1.5 sleeping 1.01 vs spinning 0.72 (156M: 4.43 vs 3.80). So spinning stays the default.
NO_SPINNING = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}

#: SessionOptions of every generator session: the shapes change at every step (the mask and the cache
#: grow by one token), so onnxruntime's memory pattern, planned per set of input shapes, would be
#: planned anew at every step and never reused.
GENERATION_OPTIONS = {"enable_mem_pattern": False}


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


class Generator:
    """Token generation with an artifact's KV-cached decoder (see the module)."""

    def __init__(self, path: str | pathlib.Path, *, threads: int | None = None, spin: bool = True,
                 huge_pages: bool = True):
        from tfgraph.deploy import huge_pages as pages
        from tfgraph.deploy.artifact import MODEL_FILE, load, read_manifest

        self.path = pathlib.Path(path)
        manifest = read_manifest(self.path)
        section = manifest.get("generation")
        if not section:
            raise BadInputError(f"{self.path}: not a generator artifact (its manifest has no 'generation' section); "
                                "compile a causal LM with --task text-generation")
        if manifest.get("pipeline"):
            raise BadInputError(f"{self.path}: generation from a pipelined (--stages) artifact is not supported")
        if not (self.path / MODEL_FILE).is_file():
            raise BadInputError(f"{self.path}: artifact has no {MODEL_FILE}")
        self.layout = CacheLayout.from_json(section)
        self.context_length: int | None = section.get("context_length")
        self.config: dict = {}
        if (self.path / GENERATION_CONFIG).is_file():
            try:
                self.config = json.loads((self.path / GENERATION_CONFIG).read_text())
            except ValueError as e:
                raise BadInputError(f"{self.path}/{GENERATION_CONFIG}: not valid JSON ({e})") from None
        before = pages.anonymous_mappings() if huge_pages else []
        if threads is None:
            self.session = load(self.path, config=None if spin else NO_SPINNING, options=GENERATION_OPTIONS)
        else:
            self.session = _session(self.path / MODEL_FILE, manifest, threads, spin)
        # Every token reads every weight: on 4 KiB pages a small int4 decoder's weights outgrow the TLB
        # (small Llama, 8-bit head: 1.19x -> 1.06x the builder's ms/token, benchmarks/bench_decoder.py)
        self.huge_page_bytes = pages.back_with_huge_pages(before) if before else 0
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._logits = _logits_spec(self.session, self.layout)
        self._logits_buffer: np.ndarray | None = None
        provider = self.session.get_providers()[0]
        self._device = "cuda" if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        self._past_type = np.dtype(self.layout.dtype)
        self.stats: dict = {}

    @property
    def eos_token_id(self) -> list[int]:
        """The artifact's default end-of-sequence ids (``generation_config.json``; empty when none)."""
        return _token_ids(self.config.get("eos_token_id"))

    # --- inputs -------------------------------------------------------------------------------------
    def _check(self, input_ids, attention_mask, max_new_tokens) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0 or ids.shape[0] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise BadInputError(f"input_ids must be a non-empty (batch, sequence) integer array, got shape "
                                f"{list(ids.shape)} of {ids.dtype}")
        vocab = self.layout.vocab_size
        if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
            raise BadInputError(f"input_ids must lie in [0, {vocab}) (the model's vocabulary), got {ids.min()}..{ids.max()}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise BadInputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if attention_mask is None:
            mask = np.ones(ids.shape, np.int64)
        else:
            mask = np.asarray(attention_mask)
            if mask.shape != ids.shape:
                raise BadInputError(f"attention_mask has shape {list(mask.shape)}, input_ids {list(ids.shape)}")
            if not np.isin(mask, (0, 1)).all():
                raise BadInputError("attention_mask must hold 0 (padding) and 1 (token)")
            mask = mask.astype(np.int64)
            if (np.diff(mask, axis=1) < 0).any() or (mask.sum(1) == 0).any():
                raise BadInputError("attention_mask rows must be left-padded (0s, then at least one 1): pad prompts on "
                                    "the left to generate")
            if self.layout.attention_mask is None and not mask.all():
                raise BadInputError("this decoder has no attention_mask input: prompts of a batch must have one length")
        total = ids.shape[1] + int(max_new_tokens)
        if self.context_length is not None:
            if ids.shape[1] > self.context_length:
                raise BadInputError(f"the prompt is {ids.shape[1]} tokens long, over the model's context of "
                                    f"{self.context_length} tokens")
            if total > self.context_length:
                raise BadInputError(f"the prompt ({ids.shape[1]} tokens) plus max_new_tokens ({max_new_tokens}) is "
                                    f"{total} tokens, over the model's context of {self.context_length}; ask for at "
                                    f"most {self.context_length - ids.shape[1]} new tokens")
        return ids.astype(np.int64), mask

    def _bind(self, binding, ids: np.ndarray, mask: np.ndarray, past: dict, *, shared: bool = False,
              cache_bound: bool = False, ids_bound: bool = False) -> None:
        """Bind a step's inputs and outputs. ``shared``: ``past`` holds one buffer per cache tensor, bound as
        its present output too. ``cache_bound``: those buffers and the logits buffer of this shape are
        already bound: only the ids, the mask and the positions change. ``ids_bound`` (with
        ``cache_bound``): the ids' bound value reads an array the caller rewrites in place: not rebound."""
        import onnxruntime as ort

        layout = self.layout
        if cache_bound and layout.position_ids is None:  # the per-token path: the mask (and the ids), nothing else
            if not ids_bound:
                binding.bind_cpu_input(layout.input_ids, ids)
            if layout.attention_mask is not None:
                binding.bind_cpu_input(layout.attention_mask, mask)
            return
        if not cache_bound:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
        feeds = {layout.input_ids: ids}
        if layout.attention_mask is not None:
            feeds[layout.attention_mask] = mask
        if layout.position_ids is not None:
            feeds[layout.position_ids] = mask_positions(mask, ids.shape[1])
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        if cache_bound:
            return
        for name, value in past.items():
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(value, self._device, 0)
            binding.bind_ortvalue_input(name, value)
        buffers = {present: past[name] for pp, qq in zip(layout.past, layout.present) for name, present in zip(pp, qq)
                   if shared}
        for name in self._outputs:
            if name == layout.logits and self._logits is not None:
                # onnxruntime writes the logits into a host array of ours: read in place, never copied whole
                # (a 512-token prompt's (1, 512, 32000) logits are 65 MB)
                dtype, vocab = self._logits
                self._logits_buffer = np.empty((ids.shape[0], ids.shape[1], vocab), dtype)
                binding.bind_output(name, "cpu", 0, dtype, list(self._logits_buffer.shape),
                                    self._logits_buffer.ctypes.data)
            elif name in buffers:  # the kernel appends to the buffer it reads: bound as both
                binding.bind_ortvalue_output(name, buffers[name])
            else:
                binding.bind_output(name, "cpu" if name == layout.logits else self._device)

    def _cache_buffers(self, batch: int, capacity: int) -> dict:
        """One zeroed (batch, kv_heads, capacity, head_size) buffer per past input (a shared-buffer layout)."""
        import onnxruntime as ort

        layout = self.layout
        self._buffers = [np.zeros((batch, layout.kv_heads, capacity, layout.head_size), self._past_type)
                         for _ in range(2 * layout.layers)]  # kept alive: the OrtValues read their memory on CPU
        names = [name for pair in layout.past for name in pair]
        return {name: ort.OrtValue.ortvalue_from_numpy(array, self._device, 0) for name, array in zip(names, self._buffers)}

    # --- generation -------------------------------------------------------------------------------------
    def stream(self, input_ids: np.ndarray, max_new_tokens: int, *, attention_mask: np.ndarray | None = None,
               do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
               pad_token_id: int | None = None) -> Iterator[np.ndarray]:
        """Yield each step's new tokens, shape (batch,), as they are generated (see :meth:`generate`)."""
        import onnxruntime as ort

        ids, mask = self._check(input_ids, attention_mask, max_new_tokens)
        _check_sampling(temperature, top_k, top_p)
        eos = np.array(_token_ids(eos_token_id), np.int64)
        pad = pad_token_id if pad_token_id is not None else self.config.get("pad_token_id")
        pad = int(pad if pad is not None else (eos[0] if eos.size else 0))
        rng = np.random.default_rng(seed)
        layout = self.layout
        batch = ids.shape[0]
        shared = layout.shared_buffer and self._logits is not None
        if shared:  # one buffer per cache tensor, past and present at once: no per-step copy of the cache
            past: dict = self._cache_buffers(batch, ids.shape[1] + int(max_new_tokens))
        else:
            empty = np.zeros((batch, layout.kv_heads, 0, layout.head_size), self._past_type)
            past = {name: empty for pair in layout.past for name in pair}
        binding = self.session.io_binding()
        step_ids, finished = ids, np.zeros(batch, bool)
        # batch 1: the mask grows as a view of one row of ones (contiguous, nothing allocated per token; the
        # concatenation cost ~9 us a token next to onnxruntime's spinning pool threads)
        grown = np.ones((1, ids.shape[1] + int(max_new_tokens)), np.int64) if batch == 1 else None
        if grown is not None:
            grown[:, :mask.shape[1]] = mask
        logits_at = self._outputs.index(layout.logits)
        present_at = {p: self._outputs.index(q) for pp, qq in zip(layout.past, layout.present) for p, q in zip(pp, qq)}
        # Shared buffers on the host, no position ids: from the second decode step on only the mask is rebound;
        # the ids are written into the array their bound value reads (one bind less per token).
        in_place = shared and layout.position_ids is None and self._device == "cpu"
        ids_buffer = np.empty((batch, 1), np.int64) if in_place else None
        prefill_ms = decode_ms = 0.0
        new_tokens = 0
        self.stats = {"prompt_tokens": int(ids.shape[1]), "batch": batch, "new_tokens": 0, "prefill_ms": 0.0,
                      "decode_ms": 0.0}
        try:
            for step in range(int(max_new_tokens)):
                start = time.perf_counter()
                self._bind(binding, step_ids, mask, past, shared=shared, cache_bound=shared and step > 1,
                           ids_bound=in_place and step > 1)
                if in_place and step == 1:  # from now on the ids are written into ids_buffer
                    ids_buffer[:] = step_ids
                    binding.bind_ortvalue_input(layout.input_ids, ort.OrtValue.ortvalue_from_numpy(ids_buffer))
                self.session.run_with_iobinding(binding)
                if shared:
                    last = self._logits_buffer
                else:
                    outputs = binding.get_outputs()
                    last = self._logits_buffer if self._logits is not None else outputs[logits_at].numpy()
                    past = {name: outputs[i] for name, i in present_at.items()}  # stays in onnxruntime's memory
                logits = last[:, -1, :]  # read before the next step overwrites the buffer
                if logits.dtype != np.float32:
                    logits = logits.astype(np.float32)
                tokens = _sample(logits, rng, temperature, top_k, top_p) if do_sample else logits.argmax(-1)
                if eos.size:
                    tokens = np.where(finished, pad, tokens)
                    finished |= np.isin(tokens, eos)
                tokens = tokens.astype(np.int64, copy=False)
                elapsed = (time.perf_counter() - start) * 1e3
                if step == 0:
                    prefill_ms = elapsed
                else:
                    decode_ms += elapsed
                new_tokens += 1
                yield tokens
                if eos.size and finished.all():
                    break
                if in_place:
                    ids_buffer[:, 0] = tokens
                step_ids = tokens[:, None]
                if grown is not None:
                    mask = grown[:, :mask.shape[1] + 1]
                else:
                    mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        finally:  # also when the caller stops iterating early
            self.stats.update(new_tokens=new_tokens, prefill_ms=prefill_ms, decode_ms=decode_ms)
            decoded = max(new_tokens - 1, 0)
            self.stats["decode_ms_per_token"] = decode_ms / decoded if decoded else None

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, *, attention_mask: np.ndarray | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None) -> np.ndarray:
        """The prompt followed by up to ``max_new_tokens`` new tokens, (batch, prompt + new).

        ``attention_mask`` (default: all ones) marks left padding. Greedy unless ``do_sample``.
        ``eos_token_id`` (None: no end token; :attr:`eos_token_id` is the artifact's default) ends a
        row, which then continues with ``pad_token_id`` (default: the generation config's, else the
        first eos id); generation stops early once every row has ended."""
        ids = np.asarray(input_ids)
        ids = ids[None] if ids.ndim == 1 else ids
        new = list(self.stream(ids, max_new_tokens, attention_mask=attention_mask, do_sample=do_sample,
                               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id))
        if not new:
            return ids.astype(np.int64)
        return np.concatenate([ids.astype(np.int64), np.stack(new, axis=1)], axis=1)


def _session(model: pathlib.Path, manifest: dict, threads: int, spin: bool = True):
    """The artifact's session with ``threads`` intra-op threads (its providers that exist here, its
    optimization level; pool threads sleep between operators unless ``spin``)."""
    import onnxruntime as ort

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise BadInputError(f"threads must be a positive integer, got {threads!r}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    level = (manifest.get("session_options") or {}).get("graph_optimization_level", "ORT_ENABLE_ALL")
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, str(level), ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.intra_op_num_threads = threads
    for key, value in GENERATION_OPTIONS.items():
        setattr(options, key, value)
    for key, value in ({} if spin else NO_SPINNING).items():
        options.add_session_config_entry(key, value)
    available = set(ort.get_available_providers())
    providers = [p["name"] for p in manifest.get("providers") or [] if p.get("name") in available]
    return ort.InferenceSession(str(model), options, providers=providers or ["CPUExecutionProvider"])


def _logits_spec(session, layout: CacheLayout) -> tuple[np.dtype, int] | None:
    """(element type, vocabulary) when the logits output is declared (batch, sequence, vocabulary) with the
    input ids' sequence dimension, so the generator can give onnxruntime the array to write; else None."""
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
    out = next((o for o in session.get_outputs() if o.name == layout.logits), None)
    ids = next((i for i in session.get_inputs() if i.name == layout.input_ids), None)
    if out is None or ids is None or out.type not in types or len(out.shape or []) != 3 or len(ids.shape or []) != 2:
        return None
    sequence, vocab = out.shape[1], out.shape[2]
    if sequence != ids.shape[1] or sequence is None:
        return None
    vocab = vocab if isinstance(vocab, int) else layout.vocab_size
    return (np.dtype(types[out.type]), int(vocab)) if isinstance(vocab, int) and vocab > 0 else None


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise BadInputError(f"temperature must be > 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise BadInputError(f"top_k must be a non-negative integer (0: off), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise BadInputError(f"top_p must be in (0, 1], got {top_p!r}")


def _sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """One token per row: logits / temperature, then top-k, then top-p (nucleus), then a draw."""
    scores = logits.astype(np.float64) / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = np.sort(scores, axis=-1)[:, -top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p < 1.0:
        order = np.argsort(scores, axis=-1)  # ascending, as transformers' TopPLogitsWarper
        ranked = np.take_along_axis(scores, order, axis=-1)
        probs = np.exp(ranked - ranked.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        drop = np.cumsum(probs, axis=-1) <= 1 - top_p
        drop[:, -1] = False  # keep at least one token
        scores = np.where(_unsort(drop, order), -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], np.int64)


def _unsort(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    out = np.empty_like(values)
    np.put_along_axis(out, order, values, axis=-1)
    return out
