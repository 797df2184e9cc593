"""``mtp-jax convert`` and ``mtp-jax info``: model I/O subcommands, registered by ``add_io_parsers``."""

from __future__ import annotations

import argparse
import collections
import json
import math
import shutil
from pathlib import Path
from typing import Any

_SOURCES = ("a GGUF file, an HF directory (config.json + *.safetensors), an mtp_jax orbax checkpoint "
            "directory, or a config (YAML file or bundled config name) for random weights")


def add_io_parsers(subparsers: argparse._SubParsersAction) -> None:
    c = subparsers.add_parser(
        "convert", help="convert a model between GGUF, HF, orbax and random-weight configs",
        description=f"Convert SRC ({_SOURCES}) to a GGUF file llama.cpp loads (the family's arch, NextN layers "
                    "included) or to an orbax checkpoint directory. HF -> GGUF gives the tensor names, shapes "
                    "and types of llama.cpp's convert_hf_to_gguf.py.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  mtp-jax convert ./GLM-4.5-Air glm-4.5-air-bf16.gguf --outtype bf16\n"
               "  mtp-jax convert model.gguf ./ckpt --to orbax\n  mtp-jax convert glm4moe-tiny tiny.gguf")
    c.add_argument("src", metavar="SRC", help="the model to read")
    c.add_argument("dst", metavar="DST", help="the file or directory to write (must not exist unless --force)")
    c.add_argument("--to", choices=("gguf", "orbax"), default=None,
                   help="output format (default: gguf when DST ends in .gguf, else orbax)")
    c.add_argument("--outtype", choices=("f32", "f16", "bf16"), default="bf16",
                   help="GGUF type of the weight matrices; norms, biases and the router stay f32 (default bf16)")
    c.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="orbax: parameter dtype to store (default: the source's)")
    m = c.add_mutually_exclusive_group()
    m.add_argument("--no-mtp", action="store_true", help="drop the NextN (MTP) layers (a trunk-only model)")
    m.add_argument("--mtp", action="store_true",
                   help="GGUF: write only the NextN (MTP) blocks and the tensors they share (embedding, output "
                        "norm and head) with the whole model's metadata: an MTP-only file for --mtp-head, as "
                        "llama.cpp's converter --mtp writes it")
    c.add_argument("--split-max-tensors", type=int, default=0, metavar="N",
                   help="GGUF: write a split model of at most N tensors per file, DST-0000k-of-0000n.gguf (DST less "
                        ".gguf), as llama-gguf-split --split-max-tensors N writes it (default 0: one file)")
    c.add_argument("--seed", type=int, default=0, help="seed of the random weights when SRC is a config")
    c.add_argument("--force", action="store_true", help="overwrite DST")
    c.add_argument("--no-check-finite", action="store_true",
                   help="skip the check that every weight of a GGUF source is finite (no NaN/Inf)")
    c.set_defaults(func=cmd_convert)

    i = subparsers.add_parser(
        "info", help="describe a model file or directory without loading its weights",
        description=f"Print what FILE ({_SOURCES}) holds: architecture, sizes, tensor types, whether the NextN "
                    "(MTP) layer is there, and parameter counts (total, active per token, NextN).")
    i.add_argument("file", metavar="FILE", help="the model to describe")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)


def cmd_convert(args: argparse.Namespace) -> int:
    from mtp_jax.io.gguf import write_gguf
    from mtp_jax.io.load import load_model
    from mtp_jax.io.orbax import save_orbax

    dst = Path(args.dst)
    to = args.to or ("gguf" if dst.suffix == ".gguf" else "orbax")
    if dst.exists() and not args.force:
        raise ValueError(f"{dst} exists (pass --force to overwrite)")
    if to == "gguf" and args.dtype:
        raise ValueError("--dtype applies to orbax output; GGUF takes --outtype")
    if args.split_max_tensors and to != "gguf":
        raise ValueError("--split-max-tensors applies to GGUF output")
    # GGUF output: read in float32 so the only rounding is to --outtype
    dtype = "float32" if to == "gguf" else args.dtype
    cfg, params, tok = load_model(args.src, dtype=dtype, load_mtp=not args.no_mtp, seed=args.seed,
                                  check_finite=not args.no_check_finite, quantized="dequantize")
    if args.no_mtp:
        cfg = cfg.trunk_only()
    if args.mtp and (to != "gguf" or params.nextn is None):
        raise ValueError("--mtp writes a GGUF of a model with NextN (MTP) layers")
    if to == "gguf":
        dst = write_gguf(dst, cfg, params, outtype=args.outtype, tokenizer=tok,
                         split_max_tensors=args.split_max_tensors, part="mtp" if args.mtp else "all")
    else:
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        save_orbax(dst, cfg, params, tokenizer=tok)
    print(f"wrote {dst} ({to}{', ' + args.outtype if to == 'gguf' else ''}; "
          f"NextN layer {'only' if args.mtp else 'included' if params.nextn is not None else 'not included'})")
    return 0


def describe(spec: str) -> dict[str, Any]:
    """The facts ``info`` prints, as a dict."""
    from mtp_jax.io.load import source_kind

    kind = source_kind(spec)
    path = Path(spec)
    out: dict[str, Any] = {"path": str(path), "format": kind}
    if kind == "gguf":
        out |= _describe_gguf(path)
    elif kind == "hf":
        out |= _describe_hf(path)
    elif kind == "orbax":
        out |= _describe_orbax(path)
    else:
        from mtp_jax.config import load_config

        out["config"] = load_config(spec)
    cfg = out.get("config")
    if cfg is not None:
        from mtp_jax import params as P

        out["arch"] = out.get("arch", cfg.family)
        out["nextn_layers_in_config"] = cfg.num_nextn_predict_layers
        out["param_counts"] = P.param_counts(cfg)
        out["config"] = cfg.to_dict()
    return out


def _describe_gguf(path: Path) -> dict[str, Any]:
    """A file of a registered family is validated as loading does, short of reading the weights; other archs
    only as GGUF."""
    from mtp_jax import families
    from mtp_jax.io.gguf_model import check_tensors, config_from_gguf
    from mtp_jax.io.split import open_model_files

    files = open_model_files(path)
    r = files.whole()
    f = r.fields.get("general.architecture")
    arch = f.contents() if f is not None else None
    out: dict[str, Any] = {
        "arch": arch, "bytes": sum(p.stat().st_size for p in files.paths), "files": len(files.paths),
        "tensors": len(r.tensors),
        "tensor_types": dict(collections.Counter(t.tensor_type.name for t in r.tensors).most_common()),
        "elements": sum(int(t.n_elements) for t in r.tensors),
    }
    if arch in {f.arch for f in families.registered()}:
        cfg = config_from_gguf(r, path)
        if families.by_arch(arch).read_head is not None:  # its drafter is a model file of its own
            check_tensors(r, cfg, path)
            out["drafter"] = "a file of its own (generate -md FILE)"
        else:
            out["nextn_present"] = check_tensors(r, cfg, path).nextn is not None
        out["config"] = cfg
    return out


def _describe_hf(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    from mtp_jax.config import ModelConfig

    cfg = ModelConfig.from_hf_config(path)
    types: collections.Counter = collections.Counter()
    names, elements = set(), 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="flax") as h:
            for k in h.keys():  # noqa: SIM118 (not a dict)
                s = h.get_slice(k)
                types[s.get_dtype()] += 1
                elements += math.prod(s.get_shape())
                names.add(k)
    return {"arch": f"{cfg.family} (HF {json.loads((path / 'config.json').read_text()).get('model_type')})",
            "bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")),
            "tensors": len(names), "tensor_types": dict(types.most_common()), "elements": elements,
            "nextn_present": f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" in names, "config": cfg}


def _describe_orbax(path: Path) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    from mtp_jax.config import ModelConfig
    from mtp_jax.io.orbax import CONFIG, PARAMS

    cfg = ModelConfig.from_dict(json.loads((path / CONFIG).read_text()))
    with ocp.StandardCheckpointer() as ckpt:
        meta = dict(ckpt.metadata((path / PARAMS).absolute()).item_metadata)
    return {"bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()), "tensors": len(meta),
            "tensor_types": dict(collections.Counter(str(m.dtype) for m in meta.values()).most_common()),
            "elements": sum(math.prod(m.shape) for m in meta.values()),
            "nextn_present": "nextn.0.eh_proj" in meta, "config": cfg}


def cmd_info(args: argparse.Namespace) -> int:
    d = describe(args.file)
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    cfg = d.get("config")
    print(f"{d['path']}: {d['format']}, arch {d.get('arch')}")
    if "bytes" in d:
        print(f"  size           {d['bytes']:,} bytes")
    if "tensors" in d:
        print(f"  tensors        {d['tensors']} ({d['elements']:,} elements)")
        print("  tensor types   " + ", ".join(f"{k}: {v}" for k, v in d["tensor_types"].items()))
    if cfg:
        print(f"  layers         {cfg['num_hidden_layers']} ({cfg['first_k_dense_replace']} dense lead) "
              f"+ {cfg['num_nextn_predict_layers']} NextN")
        print(f"  hidden         {cfg['hidden_size']}, heads {cfg['num_attention_heads']}/{cfg['num_key_value_heads']}"
              f" x {cfg['head_dim']}, vocab {cfg['vocab_size']}")
        print(f"  experts        {cfg['n_routed_experts']} routed ({cfg['num_experts_per_tok']} per token) "
              f"+ {cfg['n_shared_experts']} shared, ffn {cfg['moe_intermediate_size']}")
    if "nextn_present" in d:
        print(f"  NextN layer    {'present' if d['nextn_present'] else 'absent'}")
    if "drafter" in d:
        print(f"  drafter        {d['drafter']}")
    for k, v in d.get("param_counts", {}).items():
        print(f"  {k:<22} {v:>16,d}")
    return 0
