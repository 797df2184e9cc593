"""``mtp-jax quantize``: llama-quantize's command line over quantize_gguf (tools/quantize/quantize.cpp)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mtp_jax.quant import policy
from mtp_jax.quant.base import QuantError

_DESCRIPTION = """\
Quantize a GGUF model (F32/F16/BF16 weights) to one of llama-quantize's file types, tensor for tensor
as llama-quantize (llama.cpp of llama-cpp-python 0.3.36) does: the same per-tensor type mixture,
metadata and layout, so the output matches llama-quantize's byte for byte.

The IQ1_*, IQ2_*, IQ3_XXS (and Q2_K_S) mixtures need an importance matrix (--imatrix, GGUF or legacy
.dat). A standard imatrix has no entries for the NextN/MTP block (blk.N.nextn.* and the block's
attention/FFN), so such tensors fail as in llama.cpp ("Missing importance matrix ..."), unless
--mtp-fallback names a type for them.

Without OUT.gguf the output is ggml-model-FTYPE.gguf beside the input, as llama-quantize names it.
A split model (NAME-00001-of-0000N.gguf ..., as llama-gguf-split writes them) is read from its first
file; --keep-split writes one output per input split. The tensors are converted in pieces of rows,
NTHREADS (or --threads) processes at a time, so memory holds a few pieces, never the model."""

_EPILOG = "file types (FTYPE, case-insensitive, or its number):\n" + "\n".join(
    f"  {int(f):3d}  {name}" + ("" if policy.ftype_name(f) == name else f"  (alias for {policy.ftype_name(f)})")
    for name, f in policy.FTYPES.items()) + f"\n       {policy.COPY}  only copy the tensors, no quantizing"


def _tensor_type_file(path: str) -> list[str]:
    """--tensor-type-file: PATTERN=TYPE entries separated by whitespace (parse_tensor_type_file)."""
    try:
        return Path(path).read_text().split()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"failed to open file '{path}': {e.strerror}") from None


def add_quantize_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``quantize`` command to an argparse subparsers object."""
    p = subparsers.add_parser("quantize", help="quantize a GGUF file like llama-quantize",
                              description=_DESCRIPTION, epilog=_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN.gguf",
                   help="input GGUF (F32, F16 or BF16 weights; quantized ones with --allow-requantize or COPY)")
    p.add_argument("output", metavar="OUT.gguf", nargs="?",
                   help="output GGUF (written to a temp file, renamed on success); default: "
                        "ggml-model-FTYPE.gguf beside the input")
    p.add_argument("ftype", metavar="FTYPE", help="file type, e.g. Q4_K_M, IQ4_XS, Q8_0, COPY (list below)")
    p.add_argument("nthreads", metavar="NTHREADS", nargs="?",
                   help="processes converting tensor rows, this one included (as llama-quantize's nthreads; "
                        "default: all CPUs)")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix (llama-imatrix GGUF or legacy .dat)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--include-weights", metavar="NAME", action="append", default=[],
                         help="use the importance matrix only for the tensors whose name contains NAME "
                              "(plain substring; repeatable); the others are quantized without it")
    weights.add_argument("--exclude-weights", metavar="NAME", action="append", default=[],
                         help="do not use the importance matrix for the tensors whose name contains NAME "
                              "(plain substring; repeatable)")
    p.add_argument("--mtp-fallback", metavar="TYPE",
                   help="ggml type (e.g. q4_K, iq4_xs, q8_0) for NextN/MTP-block tensors that need an imatrix "
                        "but have no entry; default: fail as llama.cpp does")
    p.add_argument("--pure", action="store_true",
                   help="disable the k-quant mixtures: every tensor gets the file type's default type")
    p.add_argument("--leave-output-tensor", action="store_true",
                   help="leave output.weight as it is in the input (not quantized, --output-tensor-type "
                        "ignored for it); a larger file, possibly better quality")
    p.add_argument("--output-tensor-type", metavar="TYPE", help="ggml type for output.weight")
    p.add_argument("--token-embedding-type", metavar="TYPE", help="ggml type for token_embd.weight")
    p.add_argument("--tensor-type", metavar="PATTERN=TYPE", action="append", default=[],
                   help="ggml type for the tensors whose name matches the regex PATTERN (first match wins; "
                        "repeatable), e.g. --tensor-type ffn_down_exps=q6_K")
    p.add_argument("--tensor-type-file", metavar="FILE", dest="tensor_type", action="extend",
                   type=_tensor_type_file,
                   help="--tensor-type entries (PATTERN=TYPE) read from FILE, separated by spaces or newlines")
    p.add_argument("--allow-requantize", action="store_true",
                   help="quantize tensors that are already quantized, from their dequantized values; "
                        "WARNING: much worse than quantizing from 16 or 32 bit weights")
    p.add_argument("--dry-run", action="store_true",
                   help="print every tensor's type and size and the total, without quantizing or writing "
                        "a file (OUT.gguf may be left out); reports the first error the real run would hit "
                        "(a missing imatrix, say) as a warning")
    p.add_argument("--keep-split", action="store_true",
                   help="a split input gives one output per split: OUT (less a .gguf) + -0000k-of-0000n.gguf, "
                        "as llama-quantize --keep-split names them; llama-gguf-split --merge joins them")
    p.add_argument("--threads", metavar="N", type=int, default=None,
                   help="the same as NTHREADS")
    p.set_defaults(func=run_quantize)
    return p


def _default_output(input_path: str, ftype: str) -> Path:
    """llama-quantize's output for ``IN FTYPE``: ggml-model-<the QUANT_OPTIONS name matched>.gguf beside IN."""
    name = ftype.strip().upper()
    if name not in policy.FTYPES and name != policy.COPY:
        name = next(n for n, f in policy.FTYPES.items() if f == policy.parse_ftype(name))
    return Path(input_path).parent / f"ggml-model-{name}.gguf"


def _is_ftype(text: str) -> bool:
    """try_parse_ftype in quantize.cpp: a file type's name or number, or COPY."""
    if text.strip().upper() == policy.COPY:
        return True
    try:
        policy.parse_ftype(text)
    except QuantError:
        return False
    return True


def _positionals(args: argparse.Namespace) -> tuple[str | None, str, int | None]:
    """(OUT or None, FTYPE, NTHREADS or None) as quantize.cpp reads ``IN [OUT] FTYPE [NTHREADS]``: the word
    after IN is the file type when it parses as one (then OUT is left out), else it is OUT."""
    output, ftype, nthreads = args.output, args.ftype, args.nthreads
    if output is not None and _is_ftype(output):
        if nthreads is not None:
            raise QuantError(f"unexpected argument '{nthreads}' after NTHREADS '{ftype}' (IN [OUT] FTYPE [NTHREADS])")
        output, ftype, nthreads = None, output, ftype
    threads = args.threads
    if nthreads is not None:
        try:
            n = int(nthreads)
        except ValueError:
            raise QuantError(f"invalid nthread '{nthreads}'") from None
        if threads is not None and threads != n:
            raise QuantError(f"NTHREADS {n} and --threads {threads} disagree")
        threads = n
    return output, ftype, threads


def run_quantize(args: argparse.Namespace) -> int:
    """Run ``mtp-jax quantize``; bad input raises ValueError (QuantError/ImatrixError) with one clear line."""
    from mtp_jax.quant.gguf_quantize import quantize_gguf

    output, ftype, threads = _positionals(args)
    if output is None and not args.dry_run:
        output = _default_output(args.input, ftype)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = quantize_gguf(args.input, output, ftype, args.imatrix, pure=args.pure,
                            output_tensor_type=args.output_tensor_type,
                            token_embedding_type=args.token_embedding_type, tensor_types=args.tensor_type,
                            include_weights=args.include_weights, exclude_weights=args.exclude_weights,
                            leave_output_tensor=args.leave_output_tensor, allow_requantize=args.allow_requantize,
                            dry_run=args.dry_run, mtp_fallback=args.mtp_fallback, threads=threads,
                            keep_split=args.keep_split)
    print(summary.describe())
    return 0
