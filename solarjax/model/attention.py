"""Attention behind one seam: which implementation computes a sequence's attention to itself.

  B batch   T query length   S key length   H query heads   K kv heads   G = H / K   E head_dim

Every implementation computes the same function: softmax(q k^T / sqrt(E)) v over the keys of the
query's own segment (packed document), causal, and within Mistral's sliding window (a key is kept
iff q - k < window, as HF does). Query head h reads kv head h // G.

  xla         chunked einsums (self_attend_xla): any platform; the CPU path.
  splash      TPU: Pallas splash attention, GQA in its MQA form, segment ids, causal or local mask.
  pallas_gpu  GPU: Pallas (Triton) flash attention with segment ids; no sliding window, and kv heads
              are repeated to the query heads (the kernel has no GQA).
  cudnn       GPU: cuDNN flash attention through jax.nn.dot_product_attention; GQA and the window
              natively, but segments only as a [B, 1, T, S] mask (cuDNN turns it into a bias).
  auto        splash on TPU; on GPU cudnn where it runs the case (16-bit dtypes, head sizes up to
              128, packed documents up to 8192 tokens), else pallas_gpu (16-bit, no window shorter
              than the sequence), else xla; xla elsewhere (`choose`, a pure function of the case).

On CPU the kernels run in Pallas interpret mode (cudnn as jax.nn.dot_product_attention's xla
implementation, same arguments): slow, but the same kernels and masks, which is how the tests check
them without an accelerator. Under a mesh the kernels run per shard (shard_map): rows over the
batch axes, kv heads (and their query heads) over tensor.

Decoding with a KV cache (`attend(..., cached=True)`) always uses the einsum path: one query row.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from solarjax.errors import ConfigError
from solarjax.model.config import ATTENTION as IMPLEMENTATIONS
from solarjax.sharding import logical_to_spec, platform

_NATIVE = {"splash": ("tpu",), "pallas_gpu": ("gpu", "cuda"), "cudnn": ("gpu", "cuda")}
_NEG_INF = float(np.finfo(np.float32).min)  # finite, so a fully masked row stays NaN-free


class AttentionError(ConfigError):
    pass


# cuDNN's fused attention: 16-bit inputs, head sizes up to 128 in multiples of 8. With packed
# documents it needs the [B, 1, T, S] segment mask (T * S bytes a row): up to this length only.
_CUDNN_DTYPES = ("bfloat16", "float16")
_CUDNN_MASKED_LENGTH = 8192


def _unfit(dtype: str, head_dim: int, segments: bool, length: int, sliding_window: int | None) -> dict[str, str]:
    """{GPU kernel: why it cannot run this case}, for the kernels that cannot."""
    why = {}
    if dtype not in _CUDNN_DTYPES:
        why["cudnn"] = f"cuDNN takes {'/'.join(_CUDNN_DTYPES)} only, not {dtype}"
        # Seen on an H100: the Triton kernel's float32 blocks exhaust its shared memory.
        why["pallas_gpu"] = f"the Pallas GPU kernel runs out of shared memory at {dtype}"
    elif head_dim > 128 or head_dim % 8:
        why["cudnn"] = f"cuDNN takes head sizes up to 128 in multiples of 8, not {head_dim}"
    elif segments and length > _CUDNN_MASKED_LENGTH:
        why["cudnn"] = (f"cuDNN would hold a {length} x {length} segment mask per row (packed documents longer "
                        f"than {_CUDNN_MASKED_LENGTH} tokens)")
    window = _window_unfit(sliding_window, length)
    if window:
        why.setdefault("pallas_gpu", window)
    return why


def _window_unfit(sliding_window: int | None, length: int) -> str | None:
    if sliding_window is not None and sliding_window < length:
        return (f"the Pallas GPU kernel has no sliding window, and model.sliding_window={sliding_window} is "
                f"shorter than the sequence ({length} tokens)")
    return None


def choose(name: str, platform: str, sliding_window: int | None, length: int, dtype: str = "float32",
           head_dim: int = 128, segments: bool = True) -> str:
    """The implementation that runs `name` (one of IMPLEMENTATIONS) for sequences of `length` on
    `platform`, in compute `dtype` with heads of `head_dim`, with packed documents (`segments`) or
    not; or AttentionError when an explicitly named one cannot do that case. A pure function of
    its arguments: `auto` is splash on TPU; on GPU cudnn where it runs the case (it was faster than
    the Pallas kernel on an H100: 5.0 vs 6.2 ms fwd+bwd at 4 x 4096, bf16), else pallas_gpu where
    that does, else xla (`fallback_note` says why); xla on CPU."""
    gpu = platform in _NATIVE["pallas_gpu"]
    why = _unfit(dtype, head_dim, segments, length, sliding_window)
    if name == "auto":
        if platform == "tpu":
            return "splash"
        if gpu:
            return next((k for k in ("cudnn", "pallas_gpu") if k not in why), "xla")
        return "xla"
    if name not in IMPLEMENTATIONS:
        raise AttentionError(f"model.attention must be one of {IMPLEMENTATIONS}, got {name!r}")
    if name != "xla" and platform not in _NATIVE[name] and platform != "cpu":
        raise AttentionError(f"model.attention={name} runs on {'/'.join(_NATIVE[name])}, not on {platform}; "
                             f"use auto or xla")
    if not gpu:  # CPU: the kernels run in interpret mode, any dtype; no mode gives pallas_gpu a window
        why = {"pallas_gpu": _window_unfit(sliding_window, length)} if _window_unfit(sliding_window, length) else {}
    if name in why:
        raise AttentionError(f"model.attention={name} cannot run this model: {why[name]}; use auto or xla")
    return name


def fallback_note(name: str, chosen: str, platform: str, sliding_window: int | None, length: int,
                  dtype: str = "float32", head_dim: int = 128, segments: bool = True) -> str | None:
    """Why `auto` took xla on a GPU, for the start-up line; None when it took a fused kernel."""
    if name != "auto" or chosen != "xla" or platform not in _NATIVE["pallas_gpu"]:
        return None
    why = _unfit(dtype, head_dim, segments, length, sliding_window)
    return f"attention: xla, as no fused GPU kernel runs this case ({'; '.join(why.values())})"


def attention_mask(q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS, sliding_window: int | None) -> jax.Array:
    """[B, T, S] bool: same segment, causal by position, and within the sliding window.

    Positions restart at each packed document and rise by one per token inside it, so comparing
    positions of the same segment is the same as comparing indices (which is what the kernels do).
    """
    q_pos, k_pos = q_pos_BT[:, :, None], k_pos_BS[:, None, :]
    mask_BTS = (q_seg_BT[:, :, None] == k_seg_BS[:, None, :]) & (k_pos <= q_pos)
    if sliding_window is not None:
        mask_BTS &= q_pos - k_pos < sliding_window  # HF: key kept iff q - k < window
    return mask_BTS


def attend(q_BTHE, k, v, mask_BTS, cached=False) -> jax.Array:
    """Grouped-query attention with an explicit mask, as einsums.

    k and v are [B, S, K, E] as projected, or in the KV cache's layout when cached: k [B, K, E, S],
    v [B, K, S, E], with the queries as [B, K, G*T, E] rows: two plain batched matmuls, which
    XLA:CPU then runs without copying the cache at every decoded token (4x faster at 16 rows).
    """
    B, T, H, E = q_BTHE.shape
    K = k.shape[1 if cached else 2]
    G = H // K
    q_BTKGE = q_BTHE.reshape(B, T, K, G, E)
    if cached:
        q_BKXE = q_BTKGE.transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, E)  # X = (G, T)
        scores_BKXS = jnp.einsum("BKXE,BKES->BKXS", q_BKXE, k, preferred_element_type=jnp.float32)
        scores_BKGTS = scores_BKXS.reshape(B, K, G, T, -1) * (E ** -0.5)
    else:
        scores_BKGTS = jnp.einsum("BTKGE,BSKE->BKGTS", q_BTKGE, k, preferred_element_type=jnp.float32) * (E ** -0.5)
    scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, _NEG_INF)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v.dtype)
    if cached:
        out_BKXE = jnp.einsum("BKXS,BKSE->BKXE", probs_BKGTS.reshape(B, K, G * T, -1), v)
        out_BTKGE = out_BKXE.reshape(B, K, G, T, E).transpose(0, 3, 1, 2, 4)
    else:
        out_BTKGE = jnp.einsum("BKGTS,BSKE->BTKGE", probs_BKGTS, v)
    return out_BTKGE.reshape(B, T, H, E)


def self_attend(q_BTHE, k_BTKE, v_BTKE, positions_BT, segment_ids_BT, sliding_window: int | None,
                implementation: str = "auto") -> jax.Array:
    """Attention of a sequence to itself (training, scoring), by `implementation` (see the module)."""
    where = platform()
    name = choose(implementation, where, sliding_window, q_BTHE.shape[1], jnp.dtype(q_BTHE.dtype).name,
                  q_BTHE.shape[3])
    if name == "xla":
        return self_attend_xla(q_BTHE, k_BTKE, v_BTKE, positions_BT, segment_ids_BT, sliding_window)
    interpret = where not in _NATIVE[name]
    if interpret:
        _warn_interpret(name)
    kernel = functools.partial(_KERNELS[name], sliding_window=sliding_window, interpret=interpret)
    return _per_shard(kernel, q_BTHE, k_BTKE, v_BTKE, segment_ids_BT)


def self_attend_xla(q_BTHE, k_BTKE, v_BTKE, positions_BT, segment_ids_BT, sliding_window: int | None) -> jax.Array:
    """The einsum path, in query chunks: the chunk of queries [s, e) reads only keys [b, e), where
    b = s - window + 1 (or 0), and is recomputed in the backward pass instead of saving its
    probabilities. Exact, because a key with a later index, or one a window or more earlier, is
    always masked: positions rise by one per token within a document (see attention_mask). Half
    the score FLOPs of the full square at T = 512, and no [B, H, T, T] array is kept: 10% off a
    CPU training step (bench/b1_b2_train.py).
    """
    T = q_BTHE.shape[1]
    chunk = max(128, -(-T // 8))  # at most 8 chunks, so compile time stays flat in T

    @jax.checkpoint
    def one(q, k, v, q_pos, k_pos, q_seg, k_seg):
        return attend(q, k, v, attention_mask(q_pos, k_pos, q_seg, k_seg, sliding_window))

    outs = []
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        b = 0 if sliding_window is None else max(0, s - sliding_window + 1)
        outs.append(one(q_BTHE[:, s:e], k_BTKE[:, b:e], v_BTKE[:, b:e], positions_BT[:, s:e], positions_BT[:, b:e],
                        segment_ids_BT[:, s:e], segment_ids_BT[:, b:e]))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


@functools.cache
def _warn_interpret(name: str) -> None:
    warnings.warn(f"model.attention={name} runs in Pallas interpret mode on CPU: the same kernel, "
                  f"for testing, and slow")


def _per_shard(kernel, q_BTHE, k_BTKE, v_BTKE, seg_BT):
    """Runs kernel on each device's rows and heads; a Pallas call is opaque to the partitioner."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q_BTHE, k_BTKE, v_BTKE, seg_BT)
    kv_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), k_BTKE.shape, mesh)
    # Query heads split the same way as their kv heads (heads are kv-major), or not at all.
    q_spec = kv_spec if kv_spec[2] is not None else logical_to_spec(
        ("batch", "length", None, "head_dim"), q_BTHE.shape, mesh)
    seg_spec = jax.sharding.PartitionSpec(kv_spec[0], None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q_BTHE, k_BTKE, v_BTKE, seg_BT)


def _pad_length(multiple: int, seg_BT, *xs):
    """Pads the length axis (1) to a multiple of `multiple`; the pad is segment -1, its own document,
    so no real token reads it and no padded row is empty."""
    T = seg_BT.shape[1]
    pad = -T % multiple
    if not pad:
        return (seg_BT,) + xs
    widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
    return (jnp.pad(seg_BT, widths(seg_BT), constant_values=-1),) + tuple(jnp.pad(x, widths(x)) for x in xs)


def _block(T: int) -> int:
    return next(b for b in (512, 256, 128) if T % b == 0)


def _splash_kernel(T: int, G: int, sliding_window: int | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
        splash_attention_mask as sm,
    )
    if sliding_window is None or sliding_window >= T:
        one = sm.CausalMask((T, T))
    else:
        one = sm.LocalMask((T, T), window_size=(sliding_window - 1, 0), offset=0)
    b = _block(T)
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, use_fused_bwd_kernel=True)
    return sk.make_splash_mqa(sm.MultiHeadMask([one] * G), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _splash(q_BTHE, k_BTKE, v_BTKE, seg_BT, sliding_window, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds
    B, T, H, E = q_BTHE.shape
    K = k_BTKE.shape[2]
    seg_BT, q_BTHE, k_BTKE, v_BTKE = _pad_length(128, seg_BT, q_BTHE, k_BTKE, v_BTKE)
    Tp = seg_BT.shape[1]
    kernel = _splash_kernel(Tp, H // K, sliding_window, interpret)  # not cached: its tables belong to this trace
    q_BKGTE = (q_BTHE * E ** -0.5).reshape(B, Tp, K, H // K, E).transpose(0, 2, 3, 1, 4)  # splash does not scale
    k_BKTE, v_BKTE = k_BTKE.transpose(0, 2, 1, 3), v_BTKE.transpose(0, 2, 1, 3)
    per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # one kv head and its G query heads
    out_BKGTE = jax.vmap(per_head)(q_BKGTE, k_BKTE, v_BKTE, SegmentIds(seg_BT, seg_BT))
    return out_BKGTE.transpose(0, 3, 1, 2, 4).reshape(B, Tp, H, E)[:, :T].astype(q_BTHE.dtype)


def _pallas_gpu(q_BTHE, k_BTKE, v_BTKE, seg_BT, sliding_window, interpret):
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention
    del sliding_window  # choose() refuses a window shorter than the sequence
    B, T, H, E = q_BTHE.shape
    G = H // k_BTKE.shape[2]
    seg_BT, q_BTHE, k_BTKE, v_BTKE = _pad_length(64, seg_BT, q_BTHE, k_BTKE, v_BTKE)
    b = 128 if seg_BT.shape[1] % 128 == 0 else 64
    sizes = gpu_attention.BlockSizes(block_q=b, block_k=b, block_q_dkv=b, block_kv_dkv=b, block_q_dq=b, block_kv_dq=b)
    k_BTHE, v_BTHE = jnp.repeat(k_BTKE, G, axis=2), jnp.repeat(v_BTKE, G, axis=2)  # head h reads kv h // G
    out = gpu_attention.mha(q_BTHE, k_BTHE, v_BTHE, seg_BT, sm_scale=E ** -0.5, causal=True, block_sizes=sizes,
                            interpret=interpret)
    return out[:, :T]


def _cudnn(q_BTHE, k_BTKE, v_BTKE, seg_BT, sliding_window, interpret):
    T = q_BTHE.shape[1]
    mask_B1TS = (seg_BT[:, :, None] == seg_BT[:, None, :])[:, None]
    window = None if sliding_window is None or sliding_window >= T else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q_BTHE, k_BTKE, v_BTKE, mask=mask_B1TS, is_causal=True,
                                        local_window_size=window, implementation="xla" if interpret else "cudnn")


_KERNELS = {"splash": _splash, "pallas_gpu": _pallas_gpu, "cudnn": _cudnn}
