"""Configuration of DeepSeek-V2's multi-head latent attention, and KV-cache sizes.

The field names are those of DeepSeek-V2's released configuration
(``q_lora_rank``, ``kv_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim``,
``v_head_dim``), except ``d_model`` and ``n_heads``, which follow this
package. The symbols of the paper (DeepSeek-AI, 2024, "DeepSeek-V2", arXiv
2405.04434, section 2.1) map to them as follows:

==================  ====================  =========================================
Paper               Field                 Meaning
==================  ====================  =========================================
:math:`d`           ``d_model``           width of the hidden state ``h``
:math:`n_h`         ``n_heads``           number of attention heads
:math:`d_c'`        ``q_lora_rank``       width of the query latent ``c_Q``
:math:`d_c`         ``kv_lora_rank``      width of the key-value latent ``c_KV``
:math:`d_h`         ``qk_nope_head_dim``  per-head query and key features without RoPE
:math:`d_h^R`       ``qk_rope_head_dim``  per-head query and shared key features with RoPE
:math:`d_h`         ``v_head_dim``        per-head value features
==================  ====================  =========================================

The paper uses one :math:`d_h` for both the keys' and the values' per-head
width. The released configuration and this one keep them apart.
"""

import math
from dataclasses import dataclass
from typing import Any

from llm_scratch._checks import check_positive_int


def _check_positive_int(name: str, value: Any) -> int:
    return check_positive_int(name, value)


def _check_positive_float(name: str, value: Any, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} is invalid; expected a positive number such as {example}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value} is invalid; expected a finite positive number such as {example}")


@dataclass(frozen=True, kw_only=True)
class MLAConfig:
    """Sizes of one multi-head latent attention layer.

    Attributes:
        d_model: width of the hidden state (``hidden_size`` in Hugging Face).
        n_heads: number of attention heads.
        q_lora_rank: width of the query latent ``c_Q``. ``None`` projects the
            queries straight from the hidden state, as DeepSeek-V2-Lite does.
        kv_lora_rank: width of the key-value latent ``c_KV``.
        qk_nope_head_dim: per-head query and key features that get no RoPE.
        qk_rope_head_dim: per-head features rotated by RoPE; even. The
            rotated key part is one vector shared by all heads.
        v_head_dim: per-head value features.
        rope_theta: RoPE base, ``theta_i = rope_theta ** (-2 i / qk_rope_head_dim)``.
        rms_norm_eps: epsilon of the RMSNorm on ``c_Q`` and ``c_KV``.
        attention_bias: give ``q_down_proj``, ``kv_down_proj``,
            ``k_rope_proj`` and ``o_proj`` a bias, like Hugging Face's
            ``attention_bias``. DeepSeek-V2 has none.
    """

    d_model: int
    n_heads: int
    q_lora_rank: int | None = None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_theta: float = 10000.0
    # 1e-6 is DeepSeek-V2's value, and the eps that Hugging Face's DeepseekV2Attention
    # (transformers 5.25.0) gives its latent norms whatever the model's rms_norm_eps.
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False

    def __post_init__(self) -> None:
        sizes = ("d_model", "n_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        if self.q_lora_rank is not None:
            sizes += ("q_lora_rank",)
        for name in sizes:
            # The dataclass is frozen, so object.__setattr__ stores NumPy integers as plain ints.
            object.__setattr__(self, name, _check_positive_int(name, getattr(self, name)))
        if self.qk_rope_head_dim % 2 != 0:
            raise ValueError(
                f"qk_rope_head_dim={self.qk_rope_head_dim} is odd; RoPE rotates pairs of "
                f"features, so it must be even"
            )
        _check_positive_float("rope_theta", self.rope_theta, "10000.0")
        _check_positive_float("rms_norm_eps", self.rms_norm_eps, "1e-6")
        if not isinstance(self.attention_bias, bool):
            raise ValueError(f"attention_bias={self.attention_bias!r} is invalid; expected True or False")

    @property
    def qk_head_dim(self) -> int:
        """Per-head width of the queries and keys, ``qk_nope_head_dim + qk_rope_head_dim``."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """The factor on ``q k^T``, ``1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)``.

        Both inference paths use it. The absorbed path attends over keys of
        width ``kv_lora_rank + qk_rope_head_dim``, but its scores equal the
        naive path's, so its scale stays the same.
        """
        return 1.0 / math.sqrt(self.qk_head_dim)

    @classmethod
    def deepseek_v2(cls) -> "MLAConfig":
        """Return the attention sizes of DeepSeek-V2 (236B parameters, 60 layers).

        NOTE: the released model stretches RoPE with YaRN scaling, which this
        package does not implement, so ``rope_theta`` here describes plain
        RoPE only. The sizes, and so the cache sizes, are the released ones.
        """
        return cls(
            d_model=5120,
            n_heads=128,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
        )

    @classmethod
    def deepseek_v2_lite(cls) -> "MLAConfig":
        """Return the attention sizes of DeepSeek-V2-Lite (16B parameters, 27 layers, no query compression).

        The note on YaRN scaling in :meth:`deepseek_v2` applies here too.
        """
        return cls(
            d_model=2048,
            n_heads=16,
            q_lora_rank=None,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
        )

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> "MLAConfig":
        """Build the configuration of one attention layer from a Hugging Face ``DeepseekV2Config``.

        Reads ``hidden_size``, ``num_attention_heads``, the five DeepSeek
        sizes, ``attention_bias`` and the RoPE base (``rope_parameters`` in
        transformers 5, ``rope_theta`` in transformers 4). Raises
        ``ValueError`` for RoPE scaling such as YaRN, which this package does
        not implement, and for fewer key-value heads than heads, which
        DeepseekV2Attention does not support.
        """
        # transformers 5 keeps the base and the scaling in rope_parameters; transformers 4 has
        # rope_theta, and rope_scaling set to None or to a dict with a "type" key.
        rope_parameters = getattr(hf_config, "rope_parameters", None)
        if not rope_parameters:
            rope_parameters = getattr(hf_config, "rope_scaling", None) or {}
        rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"rope_type={rope_type!r} is not supported; MLAConfig implements plain RoPE "
                f"only, rope_type 'default'"
            )
        rope_theta = rope_parameters.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))

        required = (
            "hidden_size",
            "num_attention_heads",
            "q_lora_rank",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
        )
        missing = [name for name in required if not hasattr(hf_config, name)]
        if missing:
            raise ValueError(
                f"hf_config of type {type(hf_config).__name__} is missing the attributes "
                f"{', '.join(missing)}; expected a DeepseekV2Config, which has {', '.join(required)}"
            )

        n_kv_heads = getattr(hf_config, "num_key_value_heads", None)
        if n_kv_heads is not None and n_kv_heads != hf_config.num_attention_heads:
            raise ValueError(
                f"num_key_value_heads={n_kv_heads} differs from num_attention_heads="
                f"{hf_config.num_attention_heads}; MLA expands its latent into one key per head"
            )

        return cls(
            d_model=hf_config.hidden_size,
            n_heads=hf_config.num_attention_heads,
            q_lora_rank=hf_config.q_lora_rank,
            kv_lora_rank=hf_config.kv_lora_rank,
            qk_nope_head_dim=hf_config.qk_nope_head_dim,
            qk_rope_head_dim=hf_config.qk_rope_head_dim,
            v_head_dim=hf_config.v_head_dim,
            rope_theta=float(rope_theta),
            # DeepseekV2Attention (transformers 5.25.0) builds q_a_layernorm and
            # kv_a_layernorm with eps 1e-6 whatever hf_config.rms_norm_eps is.
            rms_norm_eps=1e-6,
            attention_bias=bool(getattr(hf_config, "attention_bias", False)),
        )


def kv_cache_elements_per_token(config: Any, n_layers: int = 1) -> int:
    """Count the values a KV cache stores for each token, summed over ``n_layers`` layers.

    ``config`` is any object with these attributes:

    * ``kv_lora_rank`` and ``qk_rope_head_dim`` (an :class:`MLAConfig` or an
      MLA module): MLA caches the latent ``c_KV`` and the shared rotated key
      ``k_R``, ``kv_lora_rank + qk_rope_head_dim`` values per layer.
    * ``head_dim`` and ``n_kv_heads`` (grouped-query attention; 1 for
      multi-query attention): a key and a value per key-value head,
      ``2 * n_kv_heads * head_dim`` values per layer.
    * ``head_dim`` and ``n_heads`` without ``n_kv_heads`` (multi-head
      attention): ``2 * n_heads * head_dim`` values per layer.

    The count is of elements; multiply by the element size for bytes.
    """
    _check_positive_int("n_layers", n_layers)

    if hasattr(config, "kv_lora_rank") and hasattr(config, "qk_rope_head_dim"):
        return (config.kv_lora_rank + config.qk_rope_head_dim) * n_layers

    head_dim = getattr(config, "head_dim", None)
    n_kv_heads = getattr(config, "n_kv_heads", None)
    if n_kv_heads is None:
        n_kv_heads = getattr(config, "n_heads", None)
    if head_dim is None or n_kv_heads is None:
        raise ValueError(
            f"{type(config).__name__} has neither kv_lora_rank and qk_rope_head_dim (MLA) nor "
            f"head_dim with n_kv_heads or n_heads (MHA, GQA, MQA)"
        )
    return 2 * n_kv_heads * head_dim * n_layers
