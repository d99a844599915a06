"""Greedy agreement between a serving engine and transformers over many prompts, as one table.

Runs `qtool serve-check OUT --engine vllm --dtype DTYPE --prompts FILE --json` for each variant
(NAME=PATH:DTYPE), one after the other, and tabulates per variant: the prompts whose greedy
tokens are all equal (up to 32 tokens or the reply's EOS), those equal for 32 tokens, those equal
up to where transformers' own reply changes under 1e-6 noise on its embeddings
(`within_reference_noise`, with the number of noise draws), and the largest regret (nats;
serve-check's verdict). A variant whose JSON is in REPORT already is not run again (delete it to
re-measure); one whose JSON holds other prompts is refused. A variant that cannot be run stops the
script before REPORT/serve-check.md is rewritten. Writes REPORT/serve-check-NAME.json and
REPORT/serve-check.md. Needs the engine: make engine-vllm.

Usage: python benchmarks/serve_check_table.py --variant "w8a8 fp32=out/w8a8:float32" \
           --variant "base fp32=SMOLLM2_FOLDER:float32" [--prompts benchmarks/prompts/chat-24.txt]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from qtool.errors import QtoolError
from qtool.serve_check import read_prompts

REPO = Path(__file__).resolve().parents[1]


def variant(text: str) -> tuple[str, str, str]:
    name, _, rest = text.partition("=")
    path, _, dtype = rest.rpartition(":")
    if not name or not path or dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise argparse.ArgumentTypeError(f"NAME=PATH:DTYPE expected (DTYPE auto, float32, bfloat16 or float16), got {text!r}")
    return name, path, dtype


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run(name: str, path: str, dtype: str, prompts: list[str], args: argparse.Namespace) -> dict:
    result = args.report / f"serve-check-{slug(name)}.json"
    if result.exists():
        try:
            check = json.loads(result.read_text())
            asked = check.get("new_tokens") or max(len(p["reference"]) for p in check["prompts"])  # older JSONs
            same = {"prompts": [p["prompt"] for p in check["prompts"]] == prompts, "checkpoint": check["checkpoint"] == path,
                    "dtype": dtype == "auto" or check["engine"]["dtype"] == dtype, "--new-tokens": asked == args.new_tokens}
        except (ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"{result} is not a serve-check JSON ({exc!r}): delete it to re-measure") from None
        if not all(same.values()):
            other = ", ".join(k for k, v in same.items() if not v)
            raise SystemExit(f"{result} was measured with another {other} than --variant '{name}' asks: delete it to re-measure")
        return check
    cmd = [sys.executable, "-m", "qtool.cli", "serve-check", path, "--engine", "vllm", "--dtype", dtype,
           "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens), "--quiet", "--json", str(result)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if not result.exists():  # a FAIL still writes its JSON (exit 3); an error does not
        error = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise SystemExit(f"{name}: {error} (REPORT/serve-check.md left as it was)")
    return json.loads(result.read_text())


def row(name: str, check: dict, new_tokens: int) -> list[str]:
    prompts = check["prompts"]
    equal = sum(p["first_divergence"] is None for p in prompts)
    equal_full = sum(p["first_divergence"] is None and len(p["reference"]) >= new_tokens for p in prompts)
    within = sum(p["within_reference_noise"] for p in prompts)
    regret = max((max(p["regret"], default=0.0) for p in prompts), default=0.0)
    e = check["engine"]
    return [name, f"{e['engine']} {e['version']}, {e['dtype']}, {e['kernel']}", str(len(prompts)), str(equal),
            str(equal_full), f"{within} ({check.get('noise_seeds', 3)} draws)",  # the key came with --noise-seeds
            f"{regret:.2f}", "PASS" if check["passed"] else "FAIL"]


def provenance(name: str, path: str) -> str:
    """How the variant's checkpoint was made: its qtool.json spec, or unquantized."""
    record = Path(path) / "qtool.json"
    if not record.is_file():
        source = Path(path) / "qtool-source.json"  # qtool's cache of a model it converted from GGUF
        origin = f" (converted by qtool from {Path(json.loads(source.read_text())['gguf']).name})" if source.is_file() else ""
        return f"- {name}: `{path}`, unquantized{origin}"
    spec = json.loads(record.read_text())["spec"]
    calib = spec.get("calibration") or {}
    made = f"`--method {spec['method']}`, options {json.dumps(spec.get('options') or {})}"
    if calib:
        made += f", calibration {calib.get('source')} {calib.get('nsamples')}×{calib.get('seqlen')}, seed {spec.get('seed')}"
    return f"- {name}: `{path}`, {made}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", type=variant, required=True, metavar="NAME=PATH:DTYPE",
                        help="a row: its name, the checkpoint folder and vLLM's dtype (auto, float32, bfloat16, "
                             "float16); repeat for more rows")
    parser.add_argument("--prompts", type=Path, default=REPO / "benchmarks/prompts/chat-24.txt",
                        help="chat prompts, one per line (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    parser.add_argument("--report", type=Path, default=REPO / "reports/smollm2-cpu-formats",
                        help="folder of the JSONs and serve-check.md (default: %(default)s)")
    args = parser.parse_args()
    if args.report.exists() and not args.report.is_dir():
        raise SystemExit(f"--report {args.report} is a file; give the folder of the JSONs and serve-check.md")
    args.report.mkdir(parents=True, exist_ok=True)
    head = ["variant", "engine, dtype, kernel", "prompts", "all tokens equal", f"equal for {args.new_tokens} tokens",
            "equal up to the reference's noise", "largest regret (nats)", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    made = [provenance(name, path) for name, path, _ in args.variant]
    try:
        prompts = read_prompts(args.prompts)
    except QtoolError as exc:
        raise SystemExit(str(exc)) from None
    for name, path, dtype in args.variant:
        check = run(name, path, dtype, prompts, args)
        lines.append("| " + " | ".join(row(name, check, args.new_tokens)) + " |")
        print(lines[-1], flush=True)
    prompts = args.prompts.resolve().relative_to(REPO) if args.prompts.resolve().is_relative_to(REPO) else args.prompts
    text = [
        "# serve-check over many prompts", "",
        f"`python benchmarks/serve_check_table.py {shlex.join(sys.argv[1:])}`: each variant through `qtool serve-check "
        f"--engine vllm --dtype DTYPE --prompts {prompts}`; greedy, {args.new_tokens} new tokens, transformers in "
        f"fp32 on CPU as the reference. \"All tokens equal\": up to {args.new_tokens} tokens or the reply's EOS; \"equal for "
        f"{args.new_tokens} tokens\": those of them whose reply is that long; \"equal up to the reference's noise\": "
        "equal up to the first token where transformers' own reply changes when its input embeddings are "
        "multiplied by 1 + 1e-6·N(0,1) (the number of draws in brackets); regret: transformers' log-prob of its own top token minus that "
        "of the engine's, teacher-forced on the engine's reply (the verdict: PASS when ≤ 1 nat). Per-prompt "
        "tokens, texts and regrets: serve-check-*.json beside this file.", "", *lines, "", "Checkpoints:", *made, "",
    ]
    (args.report / "serve-check.md").write_text("\n".join(text))
    print(f"wrote {args.report / 'serve-check.md'}")


if __name__ == "__main__":
    main()
