"""Group-quantized KV codecs (``int8``, ``int4``): fewer bytes for the slower tiers.

Scales follow what the KV-quantization literature found best (KIVI, KVQuant): keys are quantized
per channel (one scale per channel over a group of tokens: key outliers sit in fixed channels),
values per token (one scale per group of channels of one token). Each group stores its minimum
and its step as float16 and its codes as unsigned integers (asymmetric, round to nearest).

``KVQuantCodec`` (codec ids 3 and up, what ``int8`` / ``int4`` write): keys and values may have
their own bits and group sizes. Payload (flat uint8), sections back to back, row-major:
  key codes   [layers, token groups, key group, kv_heads, head_dim]      (key bits per code)
  key steps   [layers, token groups, kv_heads, head_dim]                 float16
  key minima  [layers, token groups, kv_heads, head_dim]                 float16
  value codes [layers, tokens, kv_heads, channel groups, value group]    (value bits per code)
  value steps, value minima [layers, tokens, kv_heads, channel groups]   float16
keys and values each followed by their exact outliers: int32 flat indices into the section (the
keys padded), then float32 values (``outliers_per_mille``). Codes are in the KV's own order, so
decoding converts them once straight into the output and scales them in place. 4-bit codes:
byte i of a section holds code i (low nibble) and code i + ceil(n / 2) (high nibble), so
unpacking is two masks over whole int64 words.

``GroupQuantCodec`` (ids 1 and 2, written as ``int8`` / ``int4`` by earlier versions; read only):
one bit width; key codes [layers, token groups, kv_heads, head_dim, key group], 4-bit codes two
per byte, low nibble first (adjacent codes); otherwise as above.

A chunk whose token count is not a multiple of the key group is padded (for the keys only) by
repeating its last token. The sizes follow from the chunk's meta alone (``encoded_size``).

Vectorized torch with no Python loop over the data: the same code runs on a CPU or a GPU tensor.
Lossy by design: round trips are close, not equal (``max_error`` bounds the error per element).
KV that float16 steps cannot describe (values beyond +-65504, NaN or inf) raises ``CodecUnfit``;
the stage then stores the chunk raw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmcache_ext.chunk import ChunkMeta

_STAT = torch.float16  # steps and minima
_STAT_BYTES = 2
_OUTLIER_BYTES = 4  # an exact outlier's int32 index, or its float32 value


class CodecUnfit(ValueError):
    """This KV cannot be encoded by the codec (non-finite, or beyond its scale range)."""


@dataclass(frozen=True)
class _Plan:
    """Group sizes and section lengths of one chunk shape (all derived from the meta)."""

    key_group: int  # tokens per key group
    padded_tokens: int
    value_group: int  # channels per value group
    key_codes: int
    key_groups: int
    value_codes: int
    value_groups: int


@dataclass(frozen=True)
class GroupQuantCodec:
    """Asymmetric group quantization with ``bits`` per element (8 or 4). Immutable, thread-safe.

    ``key_group``: tokens per key scale (fewer if the chunk is shorter); ``value_group``:
    channels per value scale (the whole head when ``head_dim`` is not a multiple of it)."""

    id: int
    name: str
    bits: int
    key_group: int
    value_group: int

    def plan(self, meta: ChunkMeta) -> _Plan:
        return _plan(meta, self.key_group, self.value_group)

    def encoded_size(self, meta: ChunkMeta) -> int:
        plan = self.plan(meta)
        return (self._code_bytes(plan.key_codes) + self._code_bytes(plan.value_codes)
                + 2 * _STAT_BYTES * (plan.key_groups + plan.value_groups))

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        """``kv`` ``[layers, 2, tokens, kv_heads, head_dim]`` (any float dtype, any device) ->
        flat uint8 of ``encoded_size`` bytes on the same device. Raises ``CodecUnfit``."""
        plan = self.plan(ChunkMeta.of(kv))
        layers, _, tokens, heads, dim = kv.shape
        keys = kv[:, 0].float()  # [L, T, H, D]
        if plan.padded_tokens > tokens:
            pad = keys[:, tokens - 1:].expand(layers, plan.padded_tokens - tokens, heads, dim)
            keys = torch.cat([keys, pad], dim=1)
        # [L, groups, G, H, D] -> [L, groups, H, D, G]: a key group is one channel over G tokens
        keys = keys.view(layers, -1, plan.key_group, heads, dim).permute(0, 1, 3, 4, 2)
        values = kv[:, 1].float().reshape(layers, tokens, heads, -1, plan.value_group)
        sections = [*self._quantize(keys), *self._quantize(values)]
        return torch.cat([s.reshape(-1).view(torch.uint8) for s in sections])

    def decode(self, payload: torch.Tensor, meta: ChunkMeta) -> torch.Tensor:
        """Flat uint8 of ``encoded_size(meta)`` bytes -> KV of ``meta``'s dtype and shape (a new
        tensor on ``payload``'s device). The caller checks the length."""
        plan = self.plan(meta)
        layers, _, tokens, heads, dim = meta.shape
        parts = _split(payload, [self._code_bytes(plan.key_codes), _STAT_BYTES * plan.key_groups,
                                 _STAT_BYTES * plan.key_groups,
                                 self._code_bytes(plan.value_codes),
                                 _STAT_BYTES * plan.value_groups, _STAT_BYTES * plan.value_groups])
        kv = torch.empty(meta.shape, dtype=meta.dtype, device=payload.device)
        keys = self._dequantize(parts[0:3], plan.key_codes, plan.key_group)
        keys = keys.view(layers, -1, heads, dim, plan.key_group).permute(0, 1, 4, 2, 3)
        kv[:, 0] = keys.reshape(layers, plan.padded_tokens, heads, dim)[:, :tokens]
        values = self._dequantize(parts[3:6], plan.value_codes, plan.value_group)
        kv[:, 1] = values.view(layers, tokens, heads, dim)
        return kv

    def max_error(self, kv: torch.Tensor) -> float:
        """An upper bound of ``|decode(encode(kv)) - kv|`` per element: half a step of the widest
        group, plus the float16 rounding of its minimum and step, plus the dtype's rounding."""
        span = float(kv.float().abs().max()) * 2
        step = span / ((1 << self.bits) - 1)
        return step * 0.5 + span * 2 ** -10 + float(kv.float().abs().max()) * 2 ** -7

    # ---------------------------------------------------------------- internals

    def _code_bytes(self, count: int) -> int:
        return -(-count * self.bits // 8)

    def _quantize(self, groups: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Groups along the last dim -> (codes uint8 packed, steps f16, minima f16)."""
        levels = (1 << self.bits) - 1
        low = groups.amin(dim=-1, keepdim=True).to(_STAT)
        high = groups.amax(dim=-1, keepdim=True)
        step = ((high - low.float()) / levels).to(_STAT)
        if not (bool(torch.isfinite(low).all()) and bool(torch.isfinite(step).all())):
            raise CodecUnfit(f"{self.name}: KV beyond float16's range or not finite")
        divisor = torch.where(step == 0, torch.ones_like(step), step).float()
        codes = groups.sub(low.float()).div_(divisor).round_().clamp_(0, levels)
        codes = codes.to(torch.uint8).reshape(-1)
        return self._pack(codes), step, low

    def _dequantize(self, parts: list[torch.Tensor], count: int, group: int) -> torch.Tensor:
        codes = self._unpack(parts[0], count).view(-1, group).float()
        step = _as(parts[1], _STAT, [-1, 1]).float()
        low = _as(parts[2], _STAT, [-1, 1]).float()
        return codes.mul_(step).add_(low)

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return codes
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_zeros(1)])
        return codes[0::2] | (codes[1::2] << 4)

    def _unpack(self, packed: torch.Tensor, count: int) -> torch.Tensor:
        if self.bits == 8:
            return packed
        return torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(-1)[:count]


@dataclass(frozen=True)
class KVQuantCodec:
    """Asymmetric group quantization, keys and values each with their own bits (8 or 4) and
    group; the layout of codec ids 3 and up. Immutable, thread-safe.

    Keys per channel over ``key_group`` tokens, values per token over ``value_group`` channels
    (the whole head when ``head_dim`` is not a multiple of it). Codes are stored in the KV's
    own order (token-major), so decoding writes each section straight into the output.

    ``outliers_per_mille``: of each section (keys, values), that many elements per thousand, the
    largest in magnitude, are stored exactly (float32 value, int32 index; dense-and-sparse as in
    KVQuant) and quantized as 0, so the rare huge values (attention-sink tokens, outlier
    channels) no longer widen their groups' steps for every other element."""

    id: int
    name: str
    key_bits: int
    value_bits: int
    key_group: int
    value_group: int
    outliers_per_mille: int = 0

    def plan(self, meta: ChunkMeta) -> _Plan:
        return _plan(meta, self.key_group, self.value_group)

    @property
    def bits(self) -> float:
        """Code bits per element, keys and values averaged (scales not counted)."""
        return (self.key_bits + self.value_bits) / 2

    def encoded_size(self, meta: ChunkMeta) -> int:
        return sum(self._sizes(self.plan(meta)))

    def outliers(self, count: int) -> int:
        """How many of a section's ``count`` elements are stored exactly."""
        return -(-count * self.outliers_per_mille // 1000)

    def _sizes(self, plan: _Plan) -> list[int]:
        """Byte sizes of the payload's ten sections (see the module docstring)."""
        return [*self._section(plan.key_codes, self.key_bits, plan.key_groups),
                *self._section(plan.value_codes, self.value_bits, plan.value_groups)]

    def _section(self, codes: int, bits: int, groups: int) -> list[int]:
        exact = self.outliers(codes) * _OUTLIER_BYTES
        return [_code_bytes(codes, bits), _STAT_BYTES * groups, _STAT_BYTES * groups, exact, exact]

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        """``kv`` ``[layers, 2, tokens, kv_heads, head_dim]`` (any float dtype, any device) ->
        flat uint8 of ``encoded_size`` bytes on the same device. Raises ``CodecUnfit``."""
        meta = ChunkMeta.of(kv)
        plan = self.plan(meta)
        layers, _, tokens, heads, dim = kv.shape
        payload = torch.empty(self.encoded_size(meta), dtype=torch.uint8, device=kv.device)
        parts = self._parts(payload, plan)
        keys = kv[:, 0].to(torch.float32, copy=True)  # quantizing works in place
        if plan.padded_tokens > tokens:
            pad = keys[:, tokens - 1:].expand(layers, plan.padded_tokens - tokens, heads, dim)
            keys = torch.cat([keys, pad], dim=1)
        _take_outliers(keys.view(-1), self.outliers(plan.key_codes), parts[3:5])
        keys = keys.view(layers, -1, plan.key_group, heads, dim)  # a group: one channel's tokens
        _quantize(keys, 2, self.key_bits, parts[0:3], self.name)
        values = kv[:, 1].to(torch.float32, copy=True)
        _take_outliers(values.view(-1), self.outliers(plan.value_codes), parts[8:10])
        values = values.view(layers, tokens, heads, -1, plan.value_group)
        _quantize(values, 4, self.value_bits, parts[5:8], self.name)
        return payload

    def _parts(self, payload: torch.Tensor, plan: _Plan) -> list[torch.Tensor]:
        return _split(payload, self._sizes(plan))

    def sections(self, payload: torch.Tensor, meta: ChunkMeta) -> list[torch.Tensor]:
        """The ten sections of a payload of ``encoded_size(meta)`` bytes (module docstring),
        views into it."""
        return self._parts(payload, self.plan(meta))

    def check(self, payload: torch.Tensor, meta: ChunkMeta) -> None:
        """Raise ``CodecUnfit`` unless every exact outlier's index lies inside its section (a
        payload of the right length whose indices do not would write outside the KV)."""
        plan = self.plan(meta)
        parts = self._parts(payload, plan)
        for index, count in ((parts[3], plan.key_codes), (parts[8], plan.value_codes)):
            if index.numel():
                index = _as(index, torch.int32, [-1])
                if int(index.min()) < 0 or int(index.max()) >= count:
                    raise CodecUnfit(f"{self.name}: an outlier index outside its section")

    def decode(self, payload: torch.Tensor, meta: ChunkMeta) -> torch.Tensor:
        """Flat uint8 of ``encoded_size(meta)`` bytes -> KV of ``meta``'s dtype and shape (a new
        tensor on ``payload``'s device). The caller checks the length."""
        plan = self.plan(meta)
        layers, _, tokens, heads, dim = meta.shape
        parts = self._parts(payload, plan)
        kv = torch.empty(meta.shape, dtype=meta.dtype, device=payload.device)
        direct = meta.dtype == torch.float32  # else decoded in float32, then cast once
        keys_direct = direct and plan.padded_tokens == tokens
        keys = kv[:, 0] if keys_direct else kv.new_empty(
            (layers, plan.padded_tokens, heads, dim), dtype=torch.float32)
        _dequantize(parts[0:3], self.key_bits,
                    keys.view(layers, -1, plan.key_group, heads, dim), dim=2)
        _put_outliers(keys.view(layers, -1), parts[3:5])
        if not keys_direct:
            kv[:, 0] = keys[:, :tokens]
        values = kv[:, 1] if direct else torch.empty_like(kv[:, 1], dtype=torch.float32)
        _dequantize(parts[5:8], self.value_bits,
                    values.view(layers, tokens, heads, -1, plan.value_group), dim=4)
        _put_outliers(values.view(layers, -1), parts[8:10])
        if not direct:
            kv[:, 1] = values
        return kv

    def max_error(self, kv: torch.Tensor) -> float:
        """An upper bound of ``|decode(encode(kv)) - kv|`` per element (see GroupQuantCodec)."""
        return _max_error(kv, min(self.key_bits, self.value_bits))


def _take_outliers(flat: torch.Tensor, count: int, parts: list[torch.Tensor]) -> None:
    """The ``count`` largest-magnitude elements of ``flat`` (float32, contiguous) -> ``parts``
    (int32 indices, float32 values); zeroed in ``flat``. Raises ``CodecUnfit`` for NaN or inf."""
    if not count:
        return
    index = _largest(flat.abs(), count)
    if not bool(torch.isfinite(flat[index]).all()):
        raise CodecUnfit("KV that is not finite")
    parts[0].copy_(index.to(torch.int32).view(torch.uint8))
    parts[1].copy_(flat[index].view(torch.uint8))
    flat[index] = 0


def _largest(magnitude: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest of ``magnitude`` (NaN counts as the largest). A topk over
    every element is most of the encode, so: a threshold from every 16th element (1.5x the
    share, so it almost always leaves at least ``count``), then the topk of those above it."""
    sample = magnitude[::16]
    wanted = min(sample.numel(), -(-count * 3 // 32))
    floor = sample.topk(wanted, sorted=False).values.min()
    candidates = (magnitude >= floor).nonzero().squeeze(1)
    if candidates.numel() < count:  # the sample was unlucky, or NaN
        return magnitude.topk(count, sorted=False).indices
    return candidates[magnitude[candidates].topk(count, sorted=False).indices]


def _put_outliers(rows: torch.Tensor, parts: list[torch.Tensor]) -> None:
    """Write the exact outliers back into ``rows`` ([layers, elements per layer], float32; the
    indices count the section flat)."""
    if not parts[0].numel():
        return
    index = _as(parts[0], torch.int32, [-1]).long()
    per_row = rows.shape[1]
    rows.index_put_((index // per_row, index % per_row), _as(parts[1], torch.float32, [-1]))


def _code_bytes(count: int, bits: int) -> int:
    return -(-count * bits // 8)


def _quantize(groups: torch.Tensor, dim: int, bits: int, parts: list[torch.Tensor],
              name: str) -> None:
    """float32 ``groups``, a group along ``dim`` (overwritten) -> its three sections: codes
    packed, steps and minima (float16, ``groups``' shape with ``dim`` reduced away)."""
    levels = (1 << bits) - 1
    low = groups.amin(dim=dim, keepdim=True).to(_STAT)  # amin + amax: faster than aminmax
    step = groups.amax(dim=dim, keepdim=True).sub_(low.float()).div_(levels).to(_STAT)
    if not (bool(torch.isfinite(low).all()) and bool(torch.isfinite(step).all())):
        raise CodecUnfit(f"{name}: KV beyond float16's range or not finite")
    inverse = torch.where(step == 0, torch.ones_like(step), step).float().reciprocal_()
    codes = groups.sub_(low.float()).mul_(inverse).round_().clamp_(0, levels)
    _pack_into(codes.view(-1).to(torch.int32), bits, parts[0])  # via int32: faster to uint8
    parts[1].copy_(step.view(-1).view(torch.uint8))
    parts[2].copy_(low.view(-1).view(torch.uint8))


def _dequantize(parts: list[torch.Tensor], bits: int, out: torch.Tensor, dim: int) -> None:
    """(codes packed, steps, minima) -> ``out`` (float32 view in the groups' layout, a group
    along ``dim``): codes converted once into ``out``, then scaled and shifted in place."""
    _unpack_into(parts[0], bits, out)
    stat_shape = list(out.shape)
    stat_shape[dim] = 1
    out.mul_(_as(parts[1], _STAT, stat_shape)).add_(_as(parts[2], _STAT, stat_shape))


def _as(part: torch.Tensor, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """Bytes as ``dtype`` (copied first where they start at an unaligned offset)."""
    if part.storage_offset() % dtype.itemsize:
        part = part.clone()
    return part.view(dtype).view(shape)


def _pack_into(codes: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Flat int32 codes -> ``out``'s bytes. 4 bits: byte i holds code i (low nibble) and code
    i + half (high nibble), half = ceil(count / 2), so unpacking is two whole-section masks."""
    if bits == 8:
        out.copy_(codes)
        return
    half = out.numel()
    low, high = codes[:half], codes[half:]
    if high.numel() < half:
        high = torch.cat([high, high.new_zeros(half - high.numel())])
    out.copy_(high.bitwise_left_shift(4).bitwise_or_(low))


def _unpack_into(packed: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Packed codes -> ``out`` (float32, ``out.numel()`` codes in its row-major order)."""
    if bits == 8:
        out.copy_(packed.view(out.shape))
        return
    if _wordwise(packed):
        words = packed.view(torch.int64)
        mask = 0x0F0F0F0F0F0F0F0F
        codes = torch.cat([(words & mask).view(torch.uint8),
                           ((words >> 4) & mask).view(torch.uint8)])
    else:
        codes = torch.cat([packed & 0x0F, packed >> 4])
    out.copy_(codes[:out.numel()].view(out.shape))


def _wordwise(codes: torch.Tensor) -> bool:
    """Whether flat uint8 ``codes`` can be viewed as int64 words."""
    return codes.numel() % 8 == 0 and codes.storage_offset() % 8 == 0


def _max_error(kv: torch.Tensor, bits: int) -> float:
    """Half a step of the widest group, plus the float16 rounding of its minimum and step, plus
    the dtype's rounding."""
    peak = float(kv.float().abs().max())
    span = peak * 2
    return span / ((1 << bits) - 1) * 0.5 + span * 2 ** -10 + peak * 2 ** -7


def _plan(meta: ChunkMeta, key_group: int, value_group: int) -> _Plan:
    """The groups and section lengths of ``meta``'s chunk: ``key_group`` tokens per key scale
    (fewer if the chunk is shorter), ``value_group`` channels per value scale (the whole head
    when ``head_dim`` is not a multiple of it)."""
    layers, _, tokens, heads, dim = _kv_shape(meta.shape)
    key_group = max(1, min(key_group, tokens))
    padded = -(-tokens // key_group) * key_group
    value_group = value_group if dim % value_group == 0 else dim
    return _Plan(key_group, padded, value_group,
                 key_codes=layers * padded * heads * dim,
                 key_groups=layers * (padded // key_group) * heads * dim,
                 value_codes=layers * tokens * heads * dim,
                 value_groups=layers * tokens * heads * (dim // value_group))


def _kv_shape(shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
    if len(shape) != 5 or shape[1] != 2 or shape[2] < 1:
        raise CodecUnfit(f"shape {shape} is not [layers, 2, tokens, kv_heads, head_dim]")
    return shape  # type: ignore[return-value]


def _split(payload: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    out, start = [], 0
    for size in sizes:
        out.append(payload[start:start + size])
        start += size
    return out


# Written by lmcache-ext before codec id 3: still read, never written.
INT8_V1 = GroupQuantCodec(id=1, name="int8-v1", bits=8, key_group=64, value_group=64)
INT4_V1 = GroupQuantCodec(id=2, name="int4-v1", bits=4, key_group=32, value_group=32)
LEGACY = (INT8_V1, INT4_V1)

# 1 % exact outliers: greedy agreement int8 0.934 -> 1.000, int4 0.55 -> 0.61 on the prompts of
# that time (docs/TIERS.md).
INT8 = KVQuantCodec(id=3, name="int8", key_bits=8, value_bits=8, key_group=64, value_group=64,
                    outliers_per_mille=10)
INT4 = KVQuantCodec(id=4, name="int4", key_bits=4, value_bits=4, key_group=32, value_group=32,
                    outliers_per_mille=10)
Codec = GroupQuantCodec | KVQuantCodec
