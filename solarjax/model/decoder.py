"""The Mistral/Llama/Qwen2 decoder in Flax linen.

Tensor names carry their shapes, and einsums use the same letters:
  B batch   T query length   S key length   D embed (hidden)   V vocab   L layers
  H query heads   K kv heads   G query heads per kv head (H = K*G)   E head_dim   F mlp (intermediate)

Layers are stacked on one leading axis (nn.scan), so compile time does not grow with depth and
depth up-scaling is a slice + concatenate on that axis. Parameters carry logical axis names;
solarjax.sharding maps them to mesh axes with one rules table.

Numerics follow HF transformers: RoPE in the "rotate half" convention (HF's stored q/k layout),
RMSNorm statistics, softmax and logits in float32, other math in config.dtype.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from solarjax.errors import SolarjaxError
from solarjax.model import xla_cpu
from solarjax.model.attention import attend, attention_mask, self_attend
from solarjax.model.config import ModelConfig
from solarjax.sharding import constrain, param_shardings

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init=None):
    """A parameter, by default initialised as HF does: normal(0, initializer_range)."""
    cfg = module.config
    init = init or nn.initializers.normal(stddev=cfg.initializer_range)
    value = module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(cfg.param_dtype))
    # Keeps each layer's slice of a stacked weight in its shards inside the scan, so it is gathered
    # there, one layer at a time, instead of the whole stack being gathered before the loop.
    return constrain(value, axes)


# Each weight letter's size and logical axis (solarjax.sharding.RULES), for weights declared by
# their einsum letters.
AXES = {"D": "embed", "H": "heads", "K": "kv_heads", "E": "head_dim", "F": "mlp", "V": "vocab"}


def _sizes(cfg: ModelConfig) -> dict[str, int]:
    return {"D": cfg.hidden_size, "H": cfg.num_heads, "K": cfg.num_kv_heads, "E": cfg.head_dim,
            "F": cfg.intermediate_size, "V": cfg.vocab_size}


def _weight(module: nn.Module, name: str, letters: str, decode_order: str | None = None) -> jax.Array:
    """The weight with axes `letters` (as the einsum names them), in the compute dtype; stored in
    `decode_order` instead in the decode layout (solarjax.model.xla_cpu)."""
    letters = decode_order if module.decode_layout else letters
    sizes = _sizes(module.config)
    value = _param(module, name, tuple(sizes[c] for c in letters), tuple(AXES[c] for c in letters))
    return value.astype(module.config.dtype)


def dense(module: nn.Module, name: str, eq: str, x: jax.Array) -> jax.Array:
    """x times the module's weight `name` by the einsum eq, e.g. dense(self, "q_proj", "BTD,DHE->BTHE", x);
    how it runs on each backend is xla_cpu.dense's business."""
    _, w_letters, _, contracted = xla_cpu.parse(eq)
    w = _weight(module, name, w_letters, xla_cpu.decode_order(w_letters, contracted))
    return xla_cpu.dense(eq, x, w, module.decode_layout)


def _plain_inv_freq(theta: float, E: int) -> np.ndarray:
    """RoPE's inverse frequencies [E/2], float32 as transformers computes them."""
    return np.float32(1.0) / np.float32(theta) ** (np.arange(0, E, 2).astype(np.float32) / np.float32(E))


def rope_frequencies(config: ModelConfig, positions_BT: jax.Array) -> tuple[jax.Array, float]:
    """(inv_freq [E/2], the factor on cos and sin) for config's RoPE scaling, with the formulas of
    transformers' modeling_rope_utils: every type but `dynamic` is a constant of the config.

    `dynamic` (NTK) raises the base once the sequence is longer than max_position_embeddings,
    seq_len = max(positions) + 1 over the whole batch, as transformers does for a forward over a
    full sequence. So with a KV cache (sample.py) each token's key keeps the frequencies of the
    step that wrote it (the prompt's length at prefill, position + 1 after), which is what
    transformers' generate does too. transformers also keeps a longer call's frequencies for a later
    call of length between max_position_embeddings and that one; here every call stands alone.
    """
    E, theta, s = config.head_dim, config.rope_theta, config.rope
    kind, factor = s.get("rope_type"), s.get("factor")
    inv = _plain_inv_freq(theta, E)
    if kind is None:
        return jnp.asarray(inv), 1.0
    if kind == "linear":
        return jnp.asarray(inv / np.float32(factor)), 1.0
    if kind == "llama3":
        old, low, high = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
        wavelen = np.float32(2 * math.pi) / inv
        scaled = np.where(wavelen > old / low, inv / np.float32(factor), inv)  # long waves: interpolated
        smooth = (np.float32(old) / wavelen - np.float32(low)) / np.float32(high - low)
        smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)  # between the two: blended
        return jnp.asarray(np.where(medium, smoothed, scaled).astype(np.float32)), 1.0
    if kind == "yarn":
        return _yarn(E, theta, s)
    if kind == "dynamic":
        max_pos = config.max_position_embeddings
        seq_len = jnp.maximum(jnp.max(positions_BT).astype(jnp.float32) + 1, max_pos)
        base = theta * (factor * seq_len / max_pos - (factor - 1)) ** (E / (E - 2))
        return 1.0 / base ** (jnp.arange(0, E, 2, dtype=jnp.float32) / E), 1.0
    raise ValueError(f"model.rope_scaling.rope_type {kind!r} is not supported")  # ModelConfig refuses it first


def _yarn(E: int, theta: float, s: dict) -> tuple[jax.Array, float]:
    """YaRN (arXiv 2309.00071): interpolate the long wavelengths, extrapolate the short ones with a
    linear ramp between, and scale cos/sin by the attention factor (transformers' defaults)."""
    factor, old = s["factor"], s["original_max_position_embeddings"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def dim_of(rotations):  # the dimension that turns `rotations` times over the original length
        return E * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, E - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = np.float32(theta) ** (np.arange(0, E, 2).astype(np.float32) / np.float32(E))
    extrapolation, interpolation = np.float32(1.0) / pos_freqs, np.float32(1.0) / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(E // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolated (high frequencies), 0: interpolated
    inv = interpolation * (1 - keep) + extrapolation * keep
    return jnp.asarray(inv.astype(np.float32)), float(attention_factor)


def rope(x_BTNE: jax.Array, positions_BT: jax.Array, config: ModelConfig) -> jax.Array:
    """Rotary embedding, HF's rotate-half layout: dims [0, E/2) pair with [E/2, E)."""
    inv_freq, scale = rope_frequencies(config, positions_BT)
    angle_BTe = positions_BT[..., None].astype(jnp.float32) * inv_freq
    angle_BTE = jnp.concatenate([angle_BTe, angle_BTe], axis=-1)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNE.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = jnp.cos(angle_BTE), jnp.sin(angle_BTE)
    if scale != 1.0:  # YaRN's attention factor, on cos and sin as transformers applies it
        cos, sin = cos * scale, sin * scale
    out = x_BTNE.astype(jnp.float32) * cos + rotated * sin
    return out.astype(x_BTNE.dtype)


class RMSNorm(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        scale_D = _param(self, "scale", (x_BTD.shape[-1],), ("norm",), nn.initializers.ones)
        x32 = x_BTD.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        return (scale_D * y.astype(x_BTD.dtype)).astype(self.config.dtype)


class Attention(nn.Module):
    config: ModelConfig
    decode_layout: bool = False

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, kv=None, kv_meta=None):
        """kv: this layer's cache (k_BKES, v_BKSE) or None; kv_meta: (key positions BS, key
        segments BS, write index), shared by all layers. Returns (out_BTD, updated kv or None)."""
        cfg = self.config
        H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_BTHE = dense(self, "q_proj", "BTD,DHE->BTHE", x_BTD)
        k_BTKE = dense(self, "k_proj", "BTD,DKE->BTKE", x_BTD)
        v_BTKE = dense(self, "v_proj", "BTD,DKE->BTKE", x_BTD)
        if cfg.qkv_bias:  # Qwen2; zeros at init, as HF initialises Linear biases
            zeros = nn.initializers.zeros
            q_BTHE = q_BTHE + _param(self, "q_bias", (H, E), ("heads", "head_dim"), zeros).astype(cfg.dtype)
            k_BTKE = k_BTKE + _param(self, "k_bias", (K, E), ("kv_heads", "head_dim"), zeros).astype(cfg.dtype)
            v_BTKE = v_BTKE + _param(self, "v_bias", (K, E), ("kv_heads", "head_dim"), zeros).astype(cfg.dtype)
        q_BTHE, k_BTKE = rope(q_BTHE, positions_BT, cfg), rope(k_BTKE, positions_BT, cfg)
        if kv is None:
            out_BTHE = self_attend(q_BTHE, k_BTKE, v_BTKE, positions_BT, segment_ids_BT, cfg.sliding_window,
                                   cfg.attention)
        else:
            k_pos_BS, k_seg_BS, index = kv_meta
            k_BKET = k_BTKE.transpose(0, 2, 3, 1).astype(kv[0].dtype)
            v_BKTE = v_BTKE.transpose(0, 2, 1, 3).astype(kv[1].dtype)
            kv = k, v = (jax.lax.dynamic_update_slice_in_dim(kv[0], k_BKET, index, axis=3),
                         jax.lax.dynamic_update_slice_in_dim(kv[1], v_BKTE, index, axis=2))
            mask_BTS = attention_mask(positions_BT, k_pos_BS, segment_ids_BT, k_seg_BS, cfg.sliding_window)
            out_BTHE = attend(q_BTHE, k, v, mask_BTS, cached=True)
        return dense(self, "o_proj", "BTHE,HED->BTD", out_BTHE), kv


class Mlp(nn.Module):
    config: ModelConfig
    decode_layout: bool = False

    @nn.compact
    def __call__(self, x_BTD):
        gate_BTF = dense(self, "gate_proj", "BTD,DF->BTF", x_BTD)
        up_BTF = dense(self, "up_proj", "BTD,DF->BTF", x_BTD)
        return dense(self, "down_proj", "BTF,FD->BTD", jax.nn.silu(gate_BTF) * up_BTF)


class Block(nn.Module):
    """Pre-norm decoder block; the scan carry is the residual stream."""
    config: ModelConfig
    decode_layout: bool = False

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, kv=None, kv_meta=None):
        cfg = self.config
        h_BTD = RMSNorm(cfg, name="input_layernorm")(x_BTD)
        attention = Attention(cfg, self.decode_layout, name="self_attn")
        h_BTD, kv = attention(h_BTD, positions_BT, segment_ids_BT, kv, kv_meta)
        x_BTD = x_BTD + h_BTD
        h_BTD = RMSNorm(cfg, name="post_attention_layernorm")(x_BTD)
        x_BTD = x_BTD + Mlp(cfg, self.decode_layout, name="mlp")(h_BTD)
        # The one sharding hint per block: keeps the residual stream batch-sharded between layers.
        x_BTD = constrain(x_BTD, ("batch", "length", "act_embed"))
        return x_BTD, kv


class Decoder(nn.Module):
    config: ModelConfig
    # The decode layout (sample.decode_params): layers as separate modules layers_0..layers_{L-1},
    # because XLA:CPU copies each layer's slice of a stacked weight on every scan step, and
    # projection weights stored [out, in] (solarjax.model.xla_cpu). The sampler uses it on CPU.
    decode_layout: bool = False
    scan_unroll: int = 1  # layers per scan iteration; only compile_for_topology's FLOP count changes it

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None, last_only=False,
                 hidden=False):
        """Float32 logits [B, T, V], or (logits, cache) when a KV cache is given.

        positions_BT: position of each token in its document (default 0..T-1).
        segment_ids_BT: document id per token; tokens attend only within their own document, and
          segment 0 marks padding.
        cache: from init_cache; the T tokens are written at cache["index"] and attend to every
          filled slot of their segment.
        last_only: logits of the last position only ([B, 1, V]), as a sampler's prefill needs.
        hidden: instead of logits, (final normed hidden states [B, T, D], output projection [D, V]),
          both in the compute dtype, for a loss that never holds all the logits (solarjax.train.loss).
        """
        cfg = self.config
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)

        embedding_VD = _param(self, "embed_tokens", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0).astype(cfg.dtype)

        kv = kv_meta = None
        if cache is not None:
            index = cache["index"]
            kv = (cache["k"], cache["v"])
            kv_meta = (jax.lax.dynamic_update_slice_in_dim(cache["pos"], positions_BT.astype(jnp.int32), index, 1),
                       jax.lax.dynamic_update_slice_in_dim(cache["seg"], segment_ids_BT.astype(jnp.int32), index, 1),
                       index)
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        if not self.decode_layout:
            layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=cfg.num_layers,
                             unroll=self.scan_unroll, metadata_params={nn.PARTITION_NAME: "layers"})
            x_BTD, kv = layers(cfg, name="layers")(x_BTD, positions_BT, segment_ids_BT, kv, kv_meta)
        else:
            new_kv = []
            for i in range(cfg.num_layers):
                kv_i = None if kv is None else (kv[0][i], kv[1][i])
                x_BTD, kv_i = block(cfg, True, name=f"layers_{i}")(x_BTD, positions_BT, segment_ids_BT, kv_i, kv_meta)
                new_kv.append(kv_i)
            kv = None if kv is None else (tuple(k for k, _ in new_kv), tuple(v for _, v in new_kv))

        if last_only:
            x_BTD = x_BTD[:, -1:]
        x_BTD = RMSNorm(cfg, name="norm")(x_BTD)
        if cfg.tie_word_embeddings:  # the table [V, D] is the head in the decode order
            head = embedding_VD if self.decode_layout else embedding_VD.T
        else:
            head = _weight(self, "lm_head", "DV", "VD")
        head = head.astype(cfg.dtype)  # a tied table is stored in param_dtype
        if hidden:
            return x_BTD, head
        logits_BTV = xla_cpu.dense("BTD,DV->BTV", x_BTD, head, self.decode_layout, jnp.float32)
        if cache is None:
            return logits_BTV
        return logits_BTV, {"k": kv[0], "v": kv[1], "pos": kv_meta[0], "seg": kv_meta[1], "index": index + T}


def init_cache(config: ModelConfig, batch: int, length: int, stacked: bool = True) -> dict:
    """An empty KV cache of `length` slots. Segment 0 marks empty slots, which no token attends to.
    stacked=False gives a tuple of per-layer arrays, for Decoder(decode_layout=True)."""
    k_shape = (batch, config.num_kv_heads, config.head_dim, length)  # [B, K, E, S], see attend
    v_shape = (batch, config.num_kv_heads, length, config.head_dim)  # [B, K, S, E]
    if stacked:
        k = jnp.zeros((config.num_layers,) + k_shape, config.dtype)
        v = jnp.zeros((config.num_layers,) + v_shape, config.dtype)
    else:
        k = tuple(jnp.zeros(k_shape, config.dtype) for _ in range(config.num_layers))
        v = tuple(jnp.zeros(v_shape, config.dtype) for _ in range(config.num_layers))
    return {
        "k": k,
        "v": v,
        "pos": jnp.zeros((batch, length), jnp.int32),  # [B, S] position of the token in each slot
        "seg": jnp.zeros((batch, length), jnp.int32),  # [B, S] its segment, 0 = empty or padding
        "index": jnp.zeros((), jnp.int32),  # next slot to write
    }


def _dummy_tokens() -> jax.Array:
    return jnp.zeros((1, 1), jnp.int32)


def _for_init(config: ModelConfig) -> ModelConfig:
    """Parameters do not depend on the attention kernel; init traces one token off any mesh."""
    return config.replace(attention="xla")


def abstract_params(config: ModelConfig, decode_layout: bool = False):
    """Shapes, dtypes and logical axes of every parameter (boxed), with nothing allocated."""
    return jax.eval_shape(Decoder(_for_init(config), decode_layout).init, jax.random.key(0), _dummy_tokens())["params"]


def param_count(config: ModelConfig) -> int:
    leaves = jax.tree.leaves(nn.unbox(abstract_params(config)))
    return int(sum(np.prod(leaf.shape) for leaf in leaves))


def init_params(config: ModelConfig, rng: jax.Array, mesh=None):
    """Random parameters (HF's init: normal(initializer_range), norms at one, biases at zero). With a mesh, each device creates
    only its own shard: the full model never exists on one host."""
    def init(rng):
        return nn.unbox(Decoder(_for_init(config)).init(rng, _dummy_tokens())["params"])
    if mesh is None:
        return jax.jit(init)(rng)
    return jax.jit(init, out_shardings=param_shardings(abstract_params(config), mesh))(rng)


@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, tokens_BT, positions_BT, segment_ids_BT):
    return Decoder(config).apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT)


def logits(config: ModelConfig, params, token_ids, positions=None, segment_ids=None) -> jax.Array:
    """Jitted float32 logits [B, T, V]; compiled once per config and input shape.

    positions / segment_ids ([B, T] ints) describe packed documents; see Decoder.
    """
    tokens_BT = np.asarray(token_ids)
    if tokens_BT.ndim != 2 or not np.issubdtype(tokens_BT.dtype, np.integer):
        raise SolarjaxError(f"token_ids must be integers of shape [batch, length], got {tokens_BT.dtype} "
                         f"{list(tokens_BT.shape)}")
    if tokens_BT.size and (tokens_BT.min() < 0 or tokens_BT.max() >= config.vocab_size):
        bad = tokens_BT.max() if tokens_BT.max() >= config.vocab_size else tokens_BT.min()
        raise SolarjaxError(f"token id {int(bad)} is outside the vocabulary [0, {config.vocab_size})")
    if positions is not None:
        _check_positions(np.asarray(positions), None if segment_ids is None else np.asarray(segment_ids))
    return _forward(config, params, jnp.asarray(tokens_BT, jnp.int32), positions, segment_ids)


def _check_positions(pos_BT: np.ndarray, seg_BT: np.ndarray | None) -> None:
    """The Decoder's contract (attention_mask, self_attend): within a document, positions rise by
    one per token. Padding (segment 0, as the data pipeline pads) is no document: nothing attends to it."""
    same_doc = (np.ones_like(pos_BT[:, 1:], bool) if seg_BT is None
                else (seg_BT[:, 1:] == seg_BT[:, :-1]) & (seg_BT[:, 1:] > 0))
    bad = np.argwhere(same_doc & (pos_BT[:, 1:] != pos_BT[:, :-1] + 1))
    if len(bad):
        b, t = bad[0]
        raise SolarjaxError(f"positions must rise by one per token within a document: row {b}, index {t + 1} has "
                         f"position {pos_BT[b, t + 1]} after {pos_BT[b, t]} (give segment_ids to start a new one)")
