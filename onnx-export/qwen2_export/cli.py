"""Command line: export, imatrix, keygen, sign, fetch-demo, verify."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ExportError


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _progress():
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a nicety, not a requirement
        return None
    # disable=None: bars only on a terminal, so logs and CI output stay clean.
    return lambda it, **kw: tqdm(it, file=sys.stderr, disable=None, **kw)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qwen2_export", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("export", help="turn a Hugging Face checkpoint directory or a GGUF file into a bundle")
    ex.add_argument("--from", dest="source", required=True, type=Path, help="checkpoint directory or .gguf file")
    ex.add_argument("--out", required=True, type=Path, help="bundle directory to create")
    ex.add_argument("--variants", default="fp32,fp16,int8,int4,int4k", help="comma-separated precisions")
    ex.add_argument("--profiles", default="portable,ort",
                    help="comma-separated profiles: portable, ort, gpu (float16 compute for GPU execution providers; "
                         "fp16 and int4 only)")
    ex.add_argument("--force", action="store_true", help="replace an existing bundle directory")
    ex.add_argument("--max-memory", metavar="SIZE",
                    help="quantize tensors in parallel (one thread per core) while the exporter's memory stays "
                         "within SIZE (e.g. 6G); default: one tensor at a time, the smallest footprint")
    ex.add_argument("--ort-accuracy-level", type=int, choices=range(5), default=4,
                    help="MatMulNBits accuracy_level of int4-ort and int8-ort: 4 = int8 dot products on CPU (default), "
                         "0 = float compute, for GPU execution providers")

    # The choices are checked by the export (graph.INT4K_8BIT_CHOICES): the parser stays free of its imports.
    ex.add_argument("--int4k-8bit", default="auto", metavar="auto|attn-v|none",
                    help="matrices the int4k variant keeps wide (--int4k-wide: 6 or 8 bits): auto = Q4_K_M's choice "
                         "(a quantized GGUF's Q6_K / Q8_0 tensors, else value and some down projections; best "
                         "quality), attn-v = only its value projections, none")
    ex.add_argument("--int4k-wide", default="q6k", metavar="q6k|int8",
                    help="how int4k stores the matrices --int4k-8bit names: q6k (default), 6-bit sub-blocks of 16 "
                         "(6.56 bits per weight; a GGUF's Q6_K tensors carried over bit for bit), or int8 per row")
    ex.add_argument("--imatrix", type=Path, metavar="FILE",
                    help="calibration statistics from `imatrix` (each input column's mean square activation): "
                         "they weigh int4k's scale/min search (demo model: perplexity +6.0%% -> +5.1%% of fp32)")
    ex.add_argument("--sign-key", type=Path, metavar="KEY",
                    help="sign the bundle with this Ed25519 private key (from `keygen`) as it is written")
    ex.add_argument("--signer", help="name recorded with the signature (default: the key file's name)")

    im = sub.add_parser("imatrix", help="calibration statistics for int4k: run a bundle's fp32 variant in ONNX "
                        "Runtime over text files and save each matrix's input column mean squares")
    im.add_argument("--bundle", required=True, type=Path, help="a bundle with an fp32 variant")
    im.add_argument("--text", required=True, type=Path, action="append", help="calibration text; may be repeated")
    im.add_argument("--tokens", type=int, default=8192, help="tokens of the texts used, at most")
    im.add_argument("--out", required=True, type=Path, help=".npz file to write")
    im.add_argument("--threads", type=int, default=0)

    kg = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles: KEY (private, 0600) "
                        "and KEY with .pub (the public key for [model] trusted_keys)")
    kg.add_argument("--out", required=True, type=Path, help="private key file to create")

    sg = sub.add_parser("sign", help="sign a bundle's bundle.json (writes bundle.sig)")
    sg.add_argument("--bundle", required=True, type=Path)
    sg.add_argument("--key", required=True, type=Path, help="Ed25519 private key from `keygen`")
    sg.add_argument("--signer", help="name recorded with the signature (default: the key file's name)")

    fd = sub.add_parser("fetch-demo", help="download, assemble and verify the demo GGUF; print its path")
    fd.add_argument("--model", choices=["0.5b", "1.5b"], default="0.5b")
    fd.add_argument("--cache-dir", type=Path, help="default: $QWEN2_EDGE_CACHE or ~/.cache/qwen2-edge")

    ve = sub.add_parser("verify", help="run every variant in ONNX Runtime and compare with a reference")
    ve.add_argument("--bundle", required=True, type=Path)
    ve.add_argument("--reference", type=Path, help="Hugging Face checkpoint (needs torch + transformers); "
                    "default: the bundle's fp32 variant")
    ve.add_argument("--variants", help="comma-separated variant names (default: all)")
    ve.add_argument("--prompt", default="The capital of France is")
    ve.add_argument("--steps", type=int, default=8, help="greedy decode steps after the prefill")
    ve.add_argument("--threads", type=int, default=0)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "export":
            from .bundle import DEFAULT_PROFILES, PRECISIONS, export
            from .jobs import parse_size

            max_memory = parse_size(args.max_memory) if args.max_memory is not None else None
            sign = None
            if args.sign_key is not None:  # load the key before the export's minutes, not after
                from .signing import check_signer, load_private_key

                sign = (load_private_key(args.sign_key), check_signer(args.signer or args.sign_key.stem))
            imatrix = None
            if args.imatrix is not None:
                from .imatrix import load

                imatrix = load(args.imatrix)
            out = export(args.source, args.out, _split(args.variants) or list(PRECISIONS),
                         _split(args.profiles) or list(DEFAULT_PROFILES), force=args.force, progress=_progress(),
                         log=lambda m: print(m, file=sys.stderr), accuracy_level=args.ort_accuracy_level,
                         max_memory=max_memory, sign=sign, int4k_8bit=args.int4k_8bit, imatrix=imatrix,
                         int4k_wide=args.int4k_wide)
            print(out)
        elif args.command == "imatrix":
            from .imatrix import collect, save

            texts = [t.read_text(encoding="utf-8", errors="replace") for t in args.text]
            stats = collect(args.bundle, texts, args.tokens, args.threads or None)
            save(stats, args.out)
            print(f"{args.out}: {len(stats)} matrices", file=sys.stderr)
        elif args.command == "keygen":
            from .signing import keygen

            public_path, spec = keygen(args.out)
            print(f"private key {args.out} (keep it secret), public key {public_path}:", file=sys.stderr)
            print(spec)
        elif args.command == "sign":
            from .signing import load_private_key, sign_bundle

            print(sign_bundle(args.bundle, load_private_key(args.key), args.signer or args.key.stem))
        elif args.command == "fetch-demo":
            from .fetch import MODELS, default_cache_dir, fetch

            print(fetch(MODELS[args.model], args.cache_dir or default_cache_dir(), progress=_progress()))
        elif args.command == "verify":
            from .verify import verify

            ok = verify(args.bundle, args.reference, _split(args.variants) if args.variants else None,
                        args.prompt, args.steps, args.threads or None)
            return 0 if ok else 1
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk filled up, a file went away, a permission: the system's word
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
