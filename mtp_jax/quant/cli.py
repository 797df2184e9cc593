"""``mtp-jax quantize``: llama-quantize's command line over quantize_gguf (tools/quantize/quantize.cpp)."""

from __future__ import annotations

import argparse
import logging

from mtp_jax.quant import policy

_DESCRIPTION = """\
Quantize a GGUF model (F32/F16/BF16 weights) to one of llama-quantize's file types, tensor for tensor
as llama-quantize (llama.cpp of llama-cpp-python 0.3.36) does: the same per-tensor type mixture,
metadata and layout, so the output matches llama-quantize's byte for byte.

The IQ1_*, IQ2_*, IQ3_XXS (and Q2_K_S) mixtures need an importance matrix (--imatrix, GGUF or legacy
.dat). A standard imatrix has no entries for the NextN/MTP block (blk.N.nextn.* and the block's
attention/FFN), so such tensors fail as in llama.cpp ("Missing importance matrix ..."), unless
--mtp-fallback names a type for them."""

_EPILOG = "file types (FTYPE, case-insensitive, or its number):\n" + "\n".join(
    f"  {int(f):3d}  {name}" + ("" if policy.ftype_name(f) == name else f"  (alias for {policy.ftype_name(f)})")
    for name, f in policy.FTYPES.items())


def add_quantize_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``quantize`` command to an argparse subparsers object."""
    p = subparsers.add_parser("quantize", help="quantize a GGUF file like llama-quantize",
                              description=_DESCRIPTION, epilog=_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN.gguf", help="input GGUF (F32, F16 or BF16 weights)")
    p.add_argument("output", metavar="OUT.gguf", help="output GGUF (written to a temp file, renamed on success)")
    p.add_argument("ftype", metavar="FTYPE", help="file type, e.g. Q4_K_M, IQ4_XS, Q8_0 (list below)")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix (llama-imatrix GGUF or legacy .dat)")
    p.add_argument("--mtp-fallback", metavar="TYPE",
                   help="ggml type (e.g. q4_K, iq4_xs, q8_0) for NextN/MTP-block tensors that need an imatrix "
                        "but have no entry; default: fail as llama.cpp does")
    p.add_argument("--pure", action="store_true",
                   help="disable the k-quant mixtures: every tensor gets the file type's default type")
    p.add_argument("--output-tensor-type", metavar="TYPE", help="ggml type for output.weight")
    p.add_argument("--token-embedding-type", metavar="TYPE", help="ggml type for token_embd.weight")
    p.add_argument("--tensor-type", metavar="PATTERN=TYPE", action="append", default=[],
                   help="ggml type for the tensors whose name matches the regex PATTERN (first match wins; "
                        "repeatable), e.g. --tensor-type ffn_down_exps=q6_K")
    p.add_argument("--threads", metavar="N", type=int, default=None,
                   help="worker processes for large tensors (default: all CPUs)")
    p.set_defaults(func=run_quantize)
    return p


def run_quantize(args: argparse.Namespace) -> int:
    """Run ``mtp-jax quantize``; bad input raises ValueError (QuantError/ImatrixError) with one clear line."""
    from mtp_jax.quant.gguf_quantize import quantize_gguf

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = quantize_gguf(args.input, args.output, args.ftype, args.imatrix, pure=args.pure,
                            output_tensor_type=args.output_tensor_type,
                            token_embedding_type=args.token_embedding_type, tensor_types=args.tensor_type,
                            mtp_fallback=args.mtp_fallback, threads=args.threads)
    print(summary.describe())
    return 0
