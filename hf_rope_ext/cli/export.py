"""``hf-rope-ext export``: a saved (extended) model folder as a GGUF for llama.cpp / Ollama
(calls :func:`hf_rope_ext.gguf.export_gguf`)."""

from __future__ import annotations

import argparse
import json

from ._common import subcommand

EXPORT_EXAMPLE = """examples:
  hf-rope-ext patch smollm2 --method yarn --factor 2 --out out/smollm2-yarn-16k
  hf-rope-ext export out/smollm2-yarn-16k --format gguf --out smollm2-yarn-16k.gguf --outtype q8_0 \\
      --llama-cpp ~/llama_cpp_python-0.3.36

The conversion runs llama.cpp's own convert_hf_to_gguf.py (from a llama.cpp checkout or the unpacked
llama-cpp-python sdist: pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36), then sets the rope
metadata llama.cpp reads. A GGUF input is patched directly: hf-rope-ext patch model.gguf --method yarn --factor 2
--out model-yarn.gguf"""


def _export_args(p: argparse.ArgumentParser) -> None:
    from ..gguf import OUTTYPES

    p.add_argument("model", help="model folder saved by hf-rope-ext (Llama family)")
    p.add_argument("--format", required=True, choices=["gguf"], help="output format (gguf: llama.cpp / Ollama)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--outtype", default="f16", choices=list(OUTTYPES), help="tensor type (default f16)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    p.add_argument("--llama-cpp", default=None, metavar="DIR",
                   help="llama.cpp checkout or unpacked llama-cpp-python sdist holding convert_hf_to_gguf.py "
                        "(default: $HF_ROPE_EXT_LLAMA_CPP)")
    p.add_argument("--converter-python", default=None, metavar="PYTHON",
                   help="python to run the converter with: transformers 5, torch and sentencepiece (llama.cpp's "
                        "pinned transformers 4.57.6 cannot read a tokenizer saved by transformers 5). Default: this "
                        "python")


@subcommand("export", "export a saved model folder for another runtime (GGUF for llama.cpp)", _export_args,
            EXPORT_EXAMPLE)
def _export(args: argparse.Namespace) -> int:
    from ..gguf import export_gguf

    result = export_gguf(args.model, args.out, outtype=args.outtype, overwrite=args.overwrite,
                         llama_cpp=args.llama_cpp, python=args.converter_python)
    shown = {"rope": result["keys"], "how": result["how"]}
    if result.get("changed"):
        shown["replaced_from_converter"] = {
            k: {"converter": a, "written": b} for k, (a, b) in result["changed"].items()
        }
    if result.get("dropped"):
        shown["dropped_from_converter"] = result["dropped"]
    print(json.dumps(shown, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0
