"""ModelConfig: the fields every family shares (a decoder-only MoE trunk with GQA-style sizes and NextN heads).

Each family (``mtp_jax.families``) subclasses it with its own fields and its HF / GGUF mappings; a config is
frozen and hashable, so it is passed to ``jax.jit`` as a static argument. YAML files (the bundled ones in
``mtp_jax/configs/``, package data) name their family (``family: deepseek2``; default ``glm4moe``); an HF
``config.json`` is dispatched on its ``model_type``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    family: ClassVar[str] = ""  # the GGUF general.architecture of the family (set by each subclass)

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int  # trunk layers; the NextN layers come after them (HF index num_hidden_layers)
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # dense FFN of the first_k_dense_replace leading layers
    moe_intermediate_size: int  # per routed expert; the shared expert is n_shared_experts times this
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    use_qk_norm: bool = False
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"  # compute and parameter dtype
    name: str = "glm4moe"

    def __post_init__(self):
        if not type(self).family:
            raise TypeError("ModelConfig is the shared base; build a family's config (mtp_jax.families)")
        if isinstance(self.eos_token_ids, list):
            object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        self.validate()

    # ---- derived sizes --------------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        """Rotated dims at the front of each head (HF: int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_hidden_layers)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def has_mtp(self) -> bool:
        return self.num_nextn_predict_layers > 0

    def cache_dims(self) -> tuple[tuple[int, int], tuple[int, int] | None]:
        """Per-token KV cache entry shapes (heads, dims) for K and for V (None: no V cache). GQA by default."""
        return (self.num_key_value_heads, self.head_dim), (self.num_key_value_heads, self.head_dim)

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "head_dim", "n_group", "topk_group"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ["first_k_dense_replace", "num_nextn_predict_layers", "n_shared_experts", "n_routed_experts",
                     "num_experts_per_tok", "intermediate_size", "moe_intermediate_size"]:
            if getattr(self, name) < 0:
                raise ValueError(f"ModelConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if not 0.0 < self.partial_rotary_factor <= 1.0 or self.rotary_dim % 2:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} gives rotary_dim {self.rotary_dim} "
                             f"for head_dim {self.head_dim}; it must be even and positive")
        if self.num_dense_layers and self.intermediate_size <= 0:
            raise ValueError("intermediate_size must be positive when there are dense layers")
        if self.num_moe_layers or self.num_nextn_predict_layers:  # a NextN block is a MoE block (llama.cpp graph_mtp)
            if self.n_routed_experts <= 0 or self.moe_intermediate_size <= 0:
                raise ValueError("MoE layers need n_routed_experts > 0 and moe_intermediate_size > 0")
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                                 f"[1, n_routed_experts={self.n_routed_experts}]")
            if self.n_routed_experts % self.n_group:
                raise ValueError(f"n_routed_experts ({self.n_routed_experts}) must be a multiple of "
                                 f"n_group ({self.n_group})")
            if self.topk_group > self.n_group:
                raise ValueError(f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
            per_group = self.n_routed_experts // self.n_group
            if per_group < 2:
                raise ValueError(f"each expert group needs >= 2 experts (group score = sum of its top-2), "
                                 f"got {per_group}")
            if self.topk_group * per_group < self.num_experts_per_tok:
                raise ValueError(f"topk_group ({self.topk_group}) groups of {per_group} experts cannot supply "
                                 f"num_experts_per_tok ({self.num_experts_per_tok}) experts")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        for t in (*self.eos_token_ids, *([self.bos_token_id] if self.bos_token_id is not None else [])):
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"special token id {t} is outside the vocabulary [0, {self.vocab_size})")

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def trunk_only(self) -> "ModelConfig":
        """The config without its NextN layers (what a converter's --no-mtp file declares)."""
        return self.replace(num_nextn_predict_layers=0)

    # ---- I/O -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {"family": self.family} | dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """From to_dict's keys; ``family`` picks the config class (default glm4moe)."""
        from mtp_jax import families

        d = dict(d)
        fam = families.by_arch(d.pop("family", "glm4moe"))
        names = {f.name for f in dataclasses.fields(fam.config)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {fam.config.__name__} keys: {unknown}")
        return fam.config(**d)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], dtype: str = "float32") -> "ModelConfig":
        """From an HF ``config.json``, by the family that owns its ``model_type``."""
        from mtp_jax import families

        return families.by_model_type(hf.get("model_type")).config_from_hf(hf, dtype)

    @classmethod
    def from_hf_config(cls, path: str | Path, dtype: str = "float32") -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_hf_dict(json.loads(path.read_text()), dtype=dtype)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF config.json keys of this family's transformers config."""
        from mtp_jax import families

        return families.of(self).config_to_hf(self)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = yaml.safe_load(f)
        except (UnicodeDecodeError, yaml.YAMLError) as e:  # e.g. a binary file given as a model
            why = str(e).splitlines()[0]
            raise ValueError(f"{path}: neither a GGUF file nor a YAML config ({type(e).__name__}: {why})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping of ModelConfig fields")
        if isinstance(d.get("model"), dict):  # a model: mapping; a family: key may sit beside it or inside it
            d = ({"family": d["family"]} if "family" in d else {}) | d["model"]
        return cls.from_dict(d)


CONFIGS = Path(__file__).resolve().parent / "configs"  # bundled YAML configs (package data)


def load_config(spec: str | Path) -> ModelConfig:
    """A YAML file, an HF config.json (or its directory), or the name of a bundled config (e.g. 'glm4moe-tiny')."""
    path = Path(spec)
    if not path.exists():
        path = CONFIGS / f"{spec}.yaml"
        if not path.exists():
            raise ValueError(f"no config at {spec!r} and no bundled config of that name "
                             f"(bundled: {', '.join(sorted(p.stem for p in CONFIGS.glob('*.yaml')))})")
    if path.is_dir() or path.suffix == ".json":
        return ModelConfig.from_hf_config(path)
    return ModelConfig.from_yaml(path)
