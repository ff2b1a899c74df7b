"""`ember` command line: generate | chat | info (and convert | eval | bench when their modules are present).

Flags for sampling and engine settings are generated from the SamplingParams and EngineConfig dataclasses,
so their defaults and help texts live in one place."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from ember.config import EngineConfig
from ember.errors import EmberError
from ember.sampling_params import SamplingParams

log = logging.getLogger("ember")

ENGINE_HELP = {
    "device": "cuda or cpu (default: cuda when a GPU is visible, else cpu)",
    "dtype": "activation/weight dtype: float16, bfloat16 or float32 (default: float32 on CPU; on GPU float16, "
             "or bfloat16 for an unquantized model stored in bfloat16)",
    "max_seq_len": "context length to allocate the KV cache for (default: the model's, at most 4096)",
    "page_size": "tokens per KV-cache page",
    "num_pages": "KV-cache pages to allocate (default: enough for one max_seq_len sequence)",
    "memory_limit_gib": "refuse to load if the estimate exceeds this many GiB (default: the device's free memory)",
    "fp8_prefill": "run the prompt's quantized matmuls (more than 64 rows) on FP8 tensor cores: H100/H200 only, "
                   "weights of up to 4 bits stay exact, activations are rounded to 8-bit floats per 128 values "
                   "(faster prefill, slightly different logits; off by default)",
}


def _flag_type(tp):
    """int | None -> int; plain types unchanged."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args and typing.get_origin(tp) is not tuple else tp


def add_dataclass_args(p: argparse.ArgumentParser, cls, helps: dict[str, str] | None = None, skip=()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = (helps or {}).get(f.name) or f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        tp = hints[f.name]
        if tp is bool:
            p.add_argument(flag, action="store_true", default=default, help=help_text)
        elif typing.get_origin(tp) is tuple:
            inner = typing.get_args(tp)[0]
            p.add_argument(flag, action="append", type=inner, default=None, help=help_text + " (repeatable)")
        else:
            base = _flag_type(tp)
            p.add_argument(flag, type=base if base in (int, float, str) else str, default=default,
                           help=help_text if "default" in help_text else f"{help_text} (default: {default})")


def _pick(args, cls, skip=()) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        v = getattr(args, f.name, None)
        if v is not None:
            out[f.name] = tuple(v) if isinstance(v, list) else v
    return out


def _engine(args) -> EngineConfig:
    return EngineConfig(**_pick(args, EngineConfig))


def _load(args):
    from ember.llm import LLM

    return LLM(args.model, _engine(args), progress=not args.quiet)


def cmd_generate(args) -> int:
    llm = _load(args)
    params = _pick(args, SamplingParams)
    for piece in llm.stream(args.prompt, raw=args.raw, **params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if not args.no_stats:
        print(llm.stats.line())
    return 0


def cmd_chat(args) -> int:
    llm = _load(args)
    params = _pick(args, SamplingParams)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("ember chat: type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for piece in llm.stream(history, **params):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        except EmberError as e:  # e.g. the history outgrew the context: say so and keep the session
            history.pop()
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        print()
        history.append({"role": "assistant", "content": "".join(reply)})
        print(llm.stats.line(), file=sys.stderr)


def cmd_info(args) -> int:
    from ember.io.bundled import bundled_model_path
    from ember.io.source import open_source
    from ember.llm import QUANTIZED, memory_estimate, resolve_device, resolve_dtype
    from ember.memory import GiB

    src = open_source(args.model or bundled_model_path())
    cfg, eng = src.config, _engine(args)
    device = resolve_device(eng.device)
    dtype = resolve_dtype(eng.dtype, device, cfg.torch_dtype, src.format in QUANTIZED)
    seq = eng.max_seq_len or min(cfg.max_position_embeddings, 4096)
    est = memory_estimate(src, dtype, seq, eng.page_size)
    rows = [
        ("path", str(src.path)), ("format", src.format), ("architecture", cfg.architecture),
        ("parameters", f"{cfg.num_parameters() / 1e6:.1f} M"),
        ("layers", cfg.num_layers), ("hidden / intermediate", f"{cfg.hidden_size} / {cfg.intermediate_size}"),
        ("heads (q / kv) x dim", f"{cfg.num_heads} / {cfg.num_kv_heads} x {cfg.head_dim}"),
        ("vocab", cfg.vocab_size), ("context", cfg.max_position_embeddings),
        ("rope", f"theta {cfg.rope_theta:g}, scaling {cfg.rope_scaling.kind}"),
        ("sliding window", cfg.sliding_window or "none"), ("tied embeddings", cfg.tie_word_embeddings),
    ]
    if src.gguf is not None:
        from collections import Counter

        kinds = Counter(src.gguf.tensor_type(n) for n in src.gguf.tensor_names())
        rows.append(("tensor types", ", ".join(f"{k} x{v}" for k, v in kinds.most_common())))
    rows += [
        (f"memory at {seq} tokens ({device.type}, {str(dtype)[6:]})",
         f"{est.total / GiB:.2f} GiB = weights {est.weights / GiB:.2f} + KV {est.kv_cache / GiB:.2f} "
         f"+ workspace {est.workspace / GiB:.2f}"),
        ("KV cache per 1k tokens", f"{est.kv_per_1k_tokens / GiB:.3f} GiB"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ember", description="Run quantized Llama-family models (GGUF, HF, GPTQ, "
                                "ember format) on GPU or CPU. Without --model the bundled SmolLM2-135M-Instruct is used.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp, sampling: bool):
        sp.add_argument("--model", default=None, help="HF / GPTQ / ember folder or .gguf file (default: bundled)")
        add_dataclass_args(sp, EngineConfig, ENGINE_HELP)
        if sampling:
            add_dataclass_args(sp, SamplingParams)
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")

    g = sub.add_parser("generate", help="generate a reply to one prompt and print speed stats",
                       description="Generate text for --prompt. The chat template is applied unless --raw.")
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--raw", action="store_true", help="continue the prompt as is (no chat template)")
    g.add_argument("--no-stats", action="store_true", help="do not print the stats line")
    common(g, True)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with history and streaming output")
    c.add_argument("--system", default=None, help="system prompt")
    common(c, True)
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("info", help="describe a model and estimate its memory without loading it")
    common(i, False)
    i.set_defaults(func=cmd_info)

    for mod in ("ember.quant.convert", "ember.bench.eval", "ember.bench.cli"):
        try:
            __import__(mod, fromlist=["add_cli"]).add_cli(sub, common)
        except ModuleNotFoundError as e:
            if not e.name or not mod.startswith(e.name):
                raise
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="ember: %(message)s",
                        stream=sys.stderr)
    try:
        return args.func(args)
    except EmberError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
