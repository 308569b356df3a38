"""The compiled loop of ``paged_decode`` (numba; importing this module compiles nothing).

``decode_section`` decodes one section (the keys or the values) of a ``KVQuantCodec`` payload
into per-layer paged memory. Its arithmetic is ``KVQuantCodec.decode``'s: the code converted to
float32, times the float32 step, plus the float32 minimum, each rounded (no fused multiply-add:
numba does not contract without fastmath), then converted to the cache's dtype; bfloat16 rounds
to nearest even as torch does. Inputs are checked by the caller (``paged_decode.decode_into``):
the loop does no bounds checks.
"""

from __future__ import annotations

import numba
import numpy as np

from lmcache_ext.kernels.paged_rows_loop import JIT as _JIT

_INLINE = {**_JIT, "inline": "always"}


@numba.njit(**_INLINE)
def _bf16(value):
    """float32 -> bfloat16 bits (round to nearest even; NaN as torch writes it)."""
    bits = np.float32(value).view(np.uint32)
    if bits & np.uint32(0x7FFFFFFF) > np.uint32(0x7F800000):
        return np.uint16(0x7FC0)
    return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
                     >> np.uint32(16))


@numba.njit(**_INLINE)
def _row(codes, shift, mask, scale, shift_by, per_channel, group, row, bf16):
    """One row: ``codes`` (bytes; the code is ``(byte >> shift) & mask``) scaled into ``row``;
    ``scale`` / ``shift_by`` hold one stat per channel (``per_channel``) or per ``group``."""
    dim = row.shape[0]
    if per_channel:
        if bf16:
            for d in range(dim):
                row[d] = _bf16(np.float32((codes[d] >> shift) & mask) * scale[d] + shift_by[d])
        else:
            for d in range(dim):
                row[d] = np.float32((codes[d] >> shift) & mask) * scale[d] + shift_by[d]
        return
    for g in range(scale.shape[0]):
        step, low = scale[g], shift_by[g]
        part, values = codes[g * group:(g + 1) * group], row[g * group:(g + 1) * group]
        if bf16:
            for d in range(group):
                values[d] = _bf16(np.float32((part[d] >> shift) & mask) * step + low)
        else:
            for d in range(group):
                values[d] = np.float32((part[d] >> shift) & mask) * step + low


@numba.njit(**_INLINE)
def _straddling_row(packed, half, first, scale, shift_by, per_channel, group, row, bf16):
    """The one 4-bit row whose codes start in the low nibbles and end in the high ones."""
    for d in range(row.shape[0]):
        i = first + d
        code = packed[i] & 15 if i < half else packed[i - half] >> 4
        stat = d if per_channel else d // group
        value = np.float32(code) * scale[stat] + shift_by[stat]
        row[d] = _bf16(value) if bf16 else value


def decode_section(packed, bits, steps, minima, by_token, group, layers, codes_tokens, heads,
                   dim, slots, dests, strides, bf16, outlier_index, outlier_value):
    """``_section`` compiled for this section's kind (keys or values) and the cache's dtype:
    the flags are constants there, so each loop is specialized."""
    kernel = _SPECIALIZED[(bool(by_token), bool(bf16))]
    kernel(packed, bits, steps, minima, group, layers, codes_tokens, heads, dim, slots, dests,
           strides, outlier_index, outlier_value)


@numba.njit(**_INLINE)
def _section(packed, bits, steps, minima, by_token, group, layers, codes_tokens, heads,
             dim, slots, dests, strides, bf16, outlier_index, outlier_value):
    """One section into ``dests`` (a tuple: per layer, its memory as a flat array from its
    first element; an element's offset is ``block * strides[0] + position * strides[1] +
    head * strides[2] + channel``, the same in every layer; ``strides[3]``: the block size).

    Codes are ``[layers, codes_tokens, heads, dim]`` in order (``codes_tokens`` counts the keys'
    padding). ``by_token``: one step per channel over ``group`` tokens (keys; stats
    ``[layers, codes_tokens / group, heads, dim]``), else one per ``group`` channels of a token
    (values; stats ``[layers, tokens, heads, dim / group]``). Token t goes to slot ``slots[t]``
    (negative: skipped; tokens past ``len(slots)`` are padding). The exact outliers (flat
    indices into the codes) are written last."""
    tokens = slots.shape[0]
    block_size, block_stride, position_stride, head_stride = (
        strides[3], strides[0], strides[1], strides[2])
    total = layers * codes_tokens * heads * dim
    half = total if bits == 8 else (total + 1) // 2
    mask = 255 if bits == 8 else 15
    per_layer = codes_tokens * heads * dim
    stats_per_row = dim if by_token else dim // group
    token_groups = codes_tokens // group
    order = _by_layer(outlier_index, per_layer, layers)
    next_outlier = 0
    for layer in range(layers):
        dest = dests[layer]
        for t in range(tokens):
            slot = slots[t]
            if slot < 0:
                continue
            base = (slot // block_size) * block_stride + (slot % block_size) * position_stride
            first = (layer * codes_tokens + t) * heads * dim
            if by_token:
                stat = (layer * token_groups + t // group) * heads * dim
            else:
                stat = (layer * codes_tokens + t) * heads * stats_per_row
            for _ in range(heads):
                row = dest[base:base + dim]
                scale = steps[stat:stat + stats_per_row]
                shift_by = minima[stat:stat + stats_per_row]
                if first + dim <= half:
                    _row(packed[first:first + dim], 0, mask, scale, shift_by, by_token, group,
                         row, bf16)
                elif first >= half:
                    _row(packed[first - half:first - half + dim], 4, mask, scale, shift_by,
                         by_token, group, row, bf16)
                else:
                    _straddling_row(packed, half, first, scale, shift_by, by_token, group, row,
                                    bf16)
                base += head_stride
                first += dim
                stat += stats_per_row
        while next_outlier < order.shape[0]:
            k = order[next_outlier]
            index = outlier_index[k]
            if index // per_layer != layer:
                break
            next_outlier += 1
            rest = index % per_layer
            t = rest // (heads * dim)
            if t >= tokens or slots[t] < 0:
                continue
            slot = slots[t]
            at = ((slot // block_size) * strides[0] + (slot % block_size) * strides[1]
                  + (rest // dim % heads) * strides[2] + rest % dim)
            if bf16:
                dest[at] = _bf16(outlier_value[k])
            else:
                dest[at] = outlier_value[k]


@numba.njit(**_JIT)
def _by_layer(index, per_layer, layers):
    """The outliers' order grouped by layer (a counting sort: stable, one pass each way)."""
    starts = np.zeros(layers + 1, np.int64)
    for k in range(index.shape[0]):
        starts[index[k] // per_layer + 1] += 1
    for layer in range(layers):
        starts[layer + 1] += starts[layer]
    order = np.empty(index.shape[0], np.int64)
    for k in range(index.shape[0]):
        layer = index[k] // per_layer
        order[starts[layer]] = k
        starts[layer] += 1
    return order


# One entry point per (section kind, cache dtype): the flags are constants inside each, so its
# loops compile specialized (with them as arguments a 4K int4 hit decoded in 74 ms, not 50), and
# each caches on disk under its own name.
@numba.njit(**_JIT)
def _keys_float32(packed, bits, steps, minima, group, layers, codes_tokens, heads, dim, slots,
                  dests, strides, outlier_index, outlier_value):
    _section(packed, bits, steps, minima, True, group, layers, codes_tokens, heads, dim, slots,
             dests, strides, False, outlier_index, outlier_value)


@numba.njit(**_JIT)
def _values_float32(packed, bits, steps, minima, group, layers, codes_tokens, heads, dim, slots,
                    dests, strides, outlier_index, outlier_value):
    _section(packed, bits, steps, minima, False, group, layers, codes_tokens, heads, dim, slots,
             dests, strides, False, outlier_index, outlier_value)


@numba.njit(**_JIT)
def _keys_bfloat16(packed, bits, steps, minima, group, layers, codes_tokens, heads, dim, slots,
                   dests, strides, outlier_index, outlier_value):
    _section(packed, bits, steps, minima, True, group, layers, codes_tokens, heads, dim, slots,
             dests, strides, True, outlier_index, outlier_value)


@numba.njit(**_JIT)
def _values_bfloat16(packed, bits, steps, minima, group, layers, codes_tokens, heads, dim,
                     slots, dests, strides, outlier_index, outlier_value):
    _section(packed, bits, steps, minima, False, group, layers, codes_tokens, heads, dim, slots,
             dests, strides, True, outlier_index, outlier_value)


_SPECIALIZED = {(True, False): _keys_float32, (False, False): _values_float32,
                (True, True): _keys_bfloat16, (False, True): _values_bfloat16}
