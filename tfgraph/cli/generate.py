"""``tfgraph generate ARTIFACT --prompt TEXT | --prompt-ids 1,2,3``: stream tokens from a decoder artifact."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def add_command(sub) -> None:
    p = sub.add_parser("generate", help="generate tokens from a decoder artifact (compile --task text-generation), streamed")
    p.add_argument("artifact", help="artifact folder compiled with --task text-generation")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="prompt text (tokenized with the artifact's tokenizer)")
    prompt.add_argument("--prompt-ids", metavar="ID,ID,...", help="prompt token ids, comma-separated")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate at most (default 32)")
    p.add_argument("--do-sample", action="store_true", help="sample (temperature, top-k, top-p) instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample within the smallest set of probability >= P (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (the same seed gives the same tokens)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="onnxruntime intra-op threads (default: one per core)")
    p.add_argument("--json", action="store_true",
                   help="JSON lines: one {\"token\", \"text\"} object per token as it comes, then a summary object")
    p.set_defaults(func=cmd_generate)


def _prompt_ids(text: str) -> np.ndarray:
    from tfgraph.errors import BadInputError

    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise BadInputError(f"--prompt-ids {text!r}: expected comma-separated integers such as 1,2,3") from None
    if not ids:
        raise BadInputError("--prompt-ids: give at least one token id")
    return np.array([ids], np.int64)


def cmd_generate(args: argparse.Namespace) -> int:
    from tfgraph.errors import BadInputError
    from tfgraph.deploy.generate import load_generator
    from tfgraph.deploy.text import load_tokenizer

    generator = load_generator(args.artifact, threads=args.threads)
    encoder = load_tokenizer(args.artifact, ["input_ids", "attention_mask"]) if args.prompt is not None else None
    if args.prompt is not None:
        if encoder is None:
            raise BadInputError(f"{args.artifact}: the artifact carries no tokenizer; give the prompt as --prompt-ids")
        if not args.prompt:
            raise BadInputError("--prompt is empty")
        ids = encoder.encode([args.prompt], max_length=generator.context_length)["input_ids"]
    else:
        ids = _prompt_ids(args.prompt_ids)
        encoder = load_tokenizer(args.artifact, ["input_ids", "attention_mask"]) if _has_tokenizer(args.artifact) else None
    new: list[int] = []
    shown = ""
    stream = generator.stream(ids, args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_token_id=generator.eos_token_id)
    for tokens in stream:
        new.append(int(tokens[0]))
        text = encoder.tokenizer.decode(new, skip_special_tokens=True) if encoder is not None else None
        piece = text[len(shown):] if text is not None and text.startswith(shown) else text
        shown = text if text is not None else shown
        if args.json:
            print(json.dumps({"token": new[-1], "text": piece}), flush=True)
        elif encoder is not None:
            sys.stdout.write(piece)
            sys.stdout.flush()
        else:
            print(new[-1], end=" ", flush=True)
    stats = generator.stats
    if args.json:
        print(json.dumps({"prompt_ids": ids[0].tolist(), "new_ids": new, "text": shown if encoder is not None else None,
                          "stats": stats}), flush=True)
    else:
        print()
        per = stats.get("decode_ms_per_token")
        print(f"{len(new)} tokens; prompt {stats['prompt_tokens']} tokens in {stats['prefill_ms']:.1f} ms"
              + (f", {per:.2f} ms/token after it" if per else ""), file=sys.stderr)
    return 0


def _has_tokenizer(path) -> bool:
    from tfgraph.deploy.artifact import read_manifest

    return bool(read_manifest(path).get("tokenizer"))
