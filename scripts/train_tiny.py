"""Train the embedded default model: a tiny GLM-4.5-style MoE with one NextN (MTP) head, on the Python stdlib.

Corpus (on every machine, no download): ``sorted(glob(sysconfig.get_paths()['stdlib'] + '/*.py'))`` of the
running interpreter, top level only. Held out: every 10th file of that sorted list (index % 10 == 9); it is
never seen by the tokenizer or the trainer. Each file is followed by ``<|endoftext|>`` (id 0, BOS and EOS).

Tokenizer: byte-level BPE (``tokenizers``) trained on the training files only, ``<|endoftext|>`` first.

Objective: ``loss = CE(trunk) + mtp_weight * CE(NextN)``. The NextN entry at position j is the pair
(h_{j-1}, t_j) and predicts t_{j+1}: ``nextn_forward(params, shift_hidden(h), tokens)`` with h the trunk's
final-normed hidden, exactly what speculative decoding feeds it. Both losses therefore share the targets
tokens[1:]; the head's entry at window position 0 (zero hidden, mid-document) is masked out of its loss.
Gradients of the MTP loss flow into the trunk through h, as in DeepSeek-V3 (``--detach-mtp`` stops them).

Routing: the router bias (e_score_correction_bias) gets no gradient (it only selects experts); after each
step it is updated with DeepSeek-V3's auxiliary-loss-free rule, bias_e += gamma * sign(mean load - load_e),
per MoE layer including the NextN block, from the expert loads of that step's batch.

Optimizer: AdamW (weight decay on matrices only), linear warmup then cosine decay to 10% of the peak,
global-norm clipping at 1. Everything is float32 and deterministic given --seed: batch s is drawn from
numpy's generator seeded with (seed, s), so a resumed run reproduces an uninterrupted one.

Outputs under --out: tokenizer.json, tokens.npz (encoded splits), ckpt/step_*.npz (params + optimizer
state; a rerun resumes from the newest), log.jsonl, and final/ (params.npz keyed by pytree path,
config.yaml, tokenizer.json, train_summary.json). ``--export PATH`` then writes final/ as an F16 GGUF.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sysconfig
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mtp_jax import params as P
from mtp_jax.config import ModelConfig, load_config
from mtp_jax.io.gguf import write_gguf
from mtp_jax.io.tokenizer import Tokenizer as GGUFTokenizer
from mtp_jax.model import forward
from mtp_jax.mtp import nextn_forward, shift_hidden

EOT = "<|endoftext|>"
HELD_OUT_EVERY = 10


# ---- corpus and tokenizer ----------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    """The running interpreter's top-level stdlib modules, sorted by name."""
    return [Path(p) for p in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))]


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """-> (train, held_out): every HELD_OUT_EVERY-th file of the sorted list is held out."""
    held = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return train, held


def read_texts(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8") for f in files]


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with <|endoftext|> as id 0; the same texts give the same tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def encode_stream(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """Concatenated ids, each text followed by <|endoftext|>. -> [N] int32."""
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids += enc.ids + [eot]
    return np.asarray(ids, np.int32)


# ---- data --------------------------------------------------------------------------------------------


def sample_batch(data: np.ndarray, seed: int, step: int, batch: int, seq_len: int) -> np.ndarray:
    """Random windows of seq_len + 1 tokens; a pure function of (seed, step). -> [B, T+1] int32."""
    starts = np.random.default_rng([seed, step]).integers(0, data.size - seq_len - 1, size=batch)
    return np.stack([data[s: s + seq_len + 1] for s in starts])


# ---- loss and train step -----------------------------------------------------------------------------


def _ce(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy over mask. logits [B, T, V], targets/mask [B, T]."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return (ce * mask).sum() / mask.sum()


def _expert_loads(stats: dict) -> list[jax.Array]:
    """Tokens routed to each expert, per MoE stack: [[L_moe, E], [1, E] (NextN)]."""
    return [stats["moe_layers"]["ffn.gate"]["count"], stats["nextn"]["ffn.gate"]["count"][None]]


def loss_fn(params: P.Params, window: jax.Array, cfg: ModelConfig, mtp_weight: float, detach_mtp: bool):
    """window [B, T+1] -> (loss, aux {lm, mtp, mtp_acc, loads})."""
    tokens, targets = window[:, :-1], window[:, 1:]
    h, logits, _, st = forward(params, tokens, None, cfg, collect_stats=True)  # h [B, T, D]
    h_in = jax.lax.stop_gradient(h) if detach_mtp else h
    _, mtp_logits, _, st_n = nextn_forward(params, shift_hidden(h_in), tokens, None, cfg, collect_stats=True)
    ones = jnp.ones(targets.shape, jnp.float32)
    mtp_mask = ones.at[:, 0].set(0.0)  # entry 0 pairs with a zero hidden mid-document: not what inference sees
    lm, mtp = _ce(logits, targets, ones), _ce(mtp_logits, targets, mtp_mask)
    mtp_acc = ((mtp_logits.argmax(-1) == targets) * mtp_mask).sum() / mtp_mask.sum()
    loads = _expert_loads({"moe_layers": st["moe_layers"], "nextn": st_n})  # unused stats are dead code under jit
    return lm + mtp_weight * mtp, {"lm": lm, "mtp": mtp, "mtp_acc": mtp_acc, "loads": loads}


NO_DECAY = {"attn_norm", "ffn_norm", "final_norm", "enorm", "hnorm", "shared_head_norm", "q_norm", "k_norm",
            "bq", "bk", "bv"}


def param_groups(params: P.Params) -> P.Params:
    """Optimizer label per leaf: "frozen" for the router bias (own update rule), "no_decay" for norms and
    attention biases, "decay" for the weight matrices (stacked layers make ndim useless for this)."""
    def label(path, _):
        name = path[-1].name
        return "frozen" if name == "bias" else "no_decay" if name in NO_DECAY else "decay"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(params: P.Params, lr: float, steps: int, warmup: int, weight_decay: float):
    """Global-norm clipping, then AdamW; returns (optimizer, lr schedule). Adam runs on the flattened
    parameter vector (same numbers, a fraction of the compile time); the router bias is left untouched."""
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * 0.1)
    groups = param_groups(params)
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.flatten(optax.scale_by_adam(b1=0.9, b2=0.95)),
        optax.add_decayed_weights(weight_decay, jax.tree.map(lambda g: g == "decay", groups)),
        optax.scale_by_learning_rate(sched),
        optax.masked(optax.set_to_zero(), jax.tree.map(lambda g: g == "frozen", groups)),
    )
    return opt, sched


def update_router_bias(params: P.Params, loads: list[jax.Array], gamma: float) -> P.Params:
    """DeepSeek-V3 aux-loss-free balancing: raise the bias of under-loaded experts, lower the over-loaded."""
    def nudge(bias, load):  # bias/load [L, E]
        return bias + gamma * jnp.sign(load.mean(-1, keepdims=True) - load)

    moe = params.moe_layers
    moe = dataclasses.replace(moe, ffn=dataclasses.replace(moe.ffn, bias=nudge(moe.ffn.bias, loads[0])))
    nn = params.nextn[0]
    nn_ffn = nn.layer.ffn
    nn = dataclasses.replace(nn, layer=dataclasses.replace(
        nn.layer, ffn=dataclasses.replace(nn_ffn, bias=nudge(nn_ffn.bias[None], loads[1])[0])))
    return dataclasses.replace(params, moe_layers=moe, nextn=(nn,))


def make_train_step(cfg: ModelConfig, opt, mtp_weight: float, detach_mtp: bool, bias_gamma: float):
    @jax.jit
    def step(params, opt_state, window):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, window, cfg, mtp_weight, detach_mtp)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = update_router_bias(optax.apply_updates(params, updates), aux["loads"], bias_gamma)
        imbalance = jnp.stack([ld.max(-1).mean() / ld.mean() for ld in aux["loads"]])  # 1 = perfectly even
        return params, opt_state, {"loss": loss, "lm": aux["lm"], "mtp": aux["mtp"], "mtp_acc": aux["mtp_acc"],
                                   "max_load_ratio": imbalance.max(), "grad_norm": optax.tree.norm(grads)}

    return step


@partial(jax.jit, static_argnames="cfg")
def _eval_losses(params, window, cfg):
    _, aux = loss_fn(params, window, cfg, 0.0, True)
    return aux["lm"], aux["mtp"]


def eval_loss(params: P.Params, cfg: ModelConfig, data: np.ndarray, batch: int, seq_len: int,
              max_batches: int) -> tuple[float, float]:
    """Mean trunk and NextN loss over up to max_batches of consecutive, non-overlapping windows."""
    n = (data.size - 1) // seq_len
    idx = np.arange(min(n, batch * max_batches))
    lm, mtp = [], []
    for i in range(0, idx.size - batch + 1, batch):
        w = np.stack([data[s * seq_len: s * seq_len + seq_len + 1] for s in idx[i: i + batch]])
        a, b = _eval_losses(params, jnp.asarray(w), cfg)
        lm.append(float(a))
        mtp.append(float(b))
    return float(np.mean(lm)), float(np.mean(mtp))


# ---- checkpoints -------------------------------------------------------------------------------------


def save_tree(path: Path, tree, **extra) -> None:
    """Leaves keyed by their pytree path (jax.tree_util.keystr), written atomically."""
    leaves = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **leaves, **{f"__{k}": np.asarray(v) for k, v in extra.items()})
    os.replace(tmp, path)


def load_tree(path: Path, like):
    """Inverse of save_tree for a tree shaped like ``like`` (-> tree, extras)."""
    with np.load(path) as z:
        flat = jax.tree_util.tree_flatten_with_path(like)[0]
        leaves = [jnp.asarray(z[jax.tree_util.keystr(k)], dtype=v.dtype) for k, v in flat]
        extra = {k[2:]: z[k] for k in z.files if k.startswith("__")}
    return jax.tree.unflatten(jax.tree.structure(like), leaves), extra


def load_params(final_dir: Path) -> tuple[ModelConfig, P.Params]:
    """(config, params) from a final/ directory written by this script."""
    cfg = load_config(final_dir / "config.yaml")
    params, _ = load_tree(final_dir / "params.npz", P.shape_dtype(cfg))
    return cfg, params


def export_gguf(final_dir: Path, path: Path) -> Path:
    """final/ -> an F16 GGUF (arch glm4moe, NextN block included) with the BPE vocabulary embedded."""
    cfg, params = load_params(final_dir)
    return write_gguf(path, cfg, params, outtype="f16", tokenizer=GGUFTokenizer.from_hf(final_dir / "tokenizer.json"))


# ---- main --------------------------------------------------------------------------------------------


def prepare_data(out: Path, vocab_size: int) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """Tokenizer + encoded (train, held-out) streams, cached under out/."""
    train_f, held_f = split_files(stdlib_files())
    tok_path, data_path = out / "tokenizer.json", out / "tokens.npz"
    if tok_path.exists() and data_path.exists():
        with np.load(data_path) as z:
            return Tokenizer.from_file(str(tok_path)), z["train"], z["held_out"]
    train_t = read_texts(train_f)
    tok = train_tokenizer(train_t, vocab_size)
    train, held = encode_stream(tok, train_t), encode_stream(tok, read_texts(held_f))
    tok.save(str(tok_path))
    np.savez(data_path, train=train, held_out=held)
    return tok, train, held


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each option's default."""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    ap.add_argument("--config", default="glm4moe-stdlib", help="model YAML (vocab_size sets the BPE size)")
    ap.add_argument("--out", default=".train", help="work directory (tokenizer, checkpoints, log, final/)")
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    ap.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of the weight matrices")
    ap.add_argument("--mtp-weight", type=float, default=0.3, help="weight of the NextN loss")
    ap.add_argument("--detach-mtp", action="store_true", help="no MTP-loss gradient into the trunk")
    ap.add_argument("--bias-gamma", type=float, default=1e-2, help="router-bias update speed (0 keeps it at 0)")
    ap.add_argument("--seed", type=int, default=0, help="init, batch order: same seed, same run")
    ap.add_argument("--eval-every", type=int, default=100, help="held-out evaluation period (steps)")
    ap.add_argument("--ckpt-every", type=int, default=100, help="checkpoint period (steps)")
    ap.add_argument("--log-every", type=int, default=10, help="training-metrics period (steps)")
    ap.add_argument("--export", metavar="GGUF", help="do not train: write OUT/final as an F16 GGUF at this path")
    a = ap.parse_args(argv)

    out = Path(a.out)
    if a.export:
        print(f"wrote {export_gguf(out / 'final', Path(a.export))}")
        return
    (out / "ckpt").mkdir(parents=True, exist_ok=True)
    cfg = load_config(a.config)
    tok, train, held = prepare_data(out, cfg.vocab_size)
    if tok.get_vocab_size() != cfg.vocab_size:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size()} ids, config says {cfg.vocab_size}")
    print(f"train {train.size} tokens, held-out {held.size} tokens", flush=True)

    params = P.init(jax.random.key(a.seed), cfg)
    opt, sched = make_optimizer(params, a.lr, a.steps, a.warmup, a.weight_decay)
    opt_state = opt.init(params)
    start = 0
    ckpts = sorted((out / "ckpt").glob("step_*.npz"))
    if ckpts:
        (params, opt_state), extra = load_tree(ckpts[-1], (params, opt_state))
        start = int(extra["step"])
        print(f"resumed from {ckpts[-1]} at step {start}", flush=True)
    step_fn = make_train_step(cfg, opt, a.mtp_weight, a.detach_mtp, a.bias_gamma)

    log = open(out / "log.jsonl", "a")
    t0, tok_seen = time.perf_counter(), 0
    for s in range(start, a.steps):
        window = jnp.asarray(sample_batch(train, a.seed, s, a.batch, a.seq_len))
        params, opt_state, m = step_fn(params, opt_state, window)
        tok_seen += a.batch * a.seq_len
        last = s + 1 == a.steps
        if (s + 1) % a.log_every == 0 or last:
            m = {k: float(v) for k, v in m.items()}
            dt = time.perf_counter() - t0
            rec = {"step": s + 1, **m, "lr": float(sched(s)), "tok_per_s": tok_seen / dt, "elapsed_s": dt}
            if (s + 1) % a.eval_every == 0 or last:
                rec["held_lm"], rec["held_mtp"] = eval_loss(params, cfg, held, a.batch, a.seq_len, 8)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()), flush=True)
        if (s + 1) % a.ckpt_every == 0 or last:
            save_tree(out / "ckpt" / f"step_{s + 1:06d}.npz", (params, opt_state), step=s + 1)
            for old in sorted((out / "ckpt").glob("step_*.npz"))[:-2]:
                old.unlink()

    final = out / "final"
    final.mkdir(exist_ok=True)
    save_tree(final / "params.npz", params)
    (final / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict()}, sort_keys=False))
    tok.save(str(final / "tokenizer.json"))
    held_lm, held_mtp = eval_loss(params, cfg, held, a.batch, a.seq_len, 10**9)
    summary = {"steps": a.steps, "batch": a.batch, "seq_len": a.seq_len, "lr": a.lr, "warmup": a.warmup,
               "weight_decay": a.weight_decay, "mtp_weight": a.mtp_weight, "detach_mtp": a.detach_mtp,
               "bias_gamma": a.bias_gamma, "seed": a.seed, "train_tokens": int(train.size),
               "held_out_tokens": int(held.size), "held_lm_full": held_lm, "held_mtp_full": held_mtp,
               "wall_s_this_run": time.perf_counter() - t0}
    (final / "train_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
