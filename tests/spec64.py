"""An independent float64 implementation of the LARS specification, for tests.

Written from docs/algorithm.md without reusing any cupylars code: plain float64
arithmetic, its own bfloat16 and float16 rounding, its own 8-bit quantizer
(argmin of float32 distances, first index on ties, which is the spec's
"lo wins ties" rule).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

MAP_SHA256 = "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"


def build_dynamic_map() -> np.ndarray:
    """The signed dynamic map built from its definition (float32 linspace means)."""
    values = [0.0, 1.0]
    for i in range(7):
        n = 2**i + 1
        # float32 linspace as torch's CPU kernel computes it: a fused multiply-add
        # start + step * k (one rounding; the float32 product is exact in float64),
        # with the second half of the points measured back from the end.
        start, end = np.float32(0.1), np.float32(1.0)
        step = np.float64((end - start) / np.float32(n - 1))
        pts = np.empty(n, dtype=np.float32)
        for k in range(n):
            if k < n // 2:
                pts[k] = np.float64(start) + step * k
            else:
                pts[k] = np.float64(end) - step * (n - 1 - k)
        means = (pts[:-1] + pts[1:]) / np.float32(2.0)
        scale = 10.0 ** (-6 + i)
        # the scale multiplies in float32, as a Python scalar times a float32 tensor does
        values += [float(np.float32(scale) * v) for v in means]
        values += [float(np.float32(-scale) * v) for v in means]
    return np.array(sorted(values), dtype=np.float32)


def map_sha256(book: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(book, dtype="<f4").tobytes()).hexdigest()


def quantize(m32: np.ndarray, book: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = m32.astype(np.float32).ravel()
    n = flat.size
    codes = np.empty(n, dtype=np.uint8)
    absmax = np.empty((n + 255) // 256, dtype=np.float32)
    for b in range(absmax.size):
        block = flat[b * 256 : (b + 1) * 256]
        a = np.float32(np.max(np.abs(block)))
        absmax[b] = a
        if a == 0:
            codes[b * 256 : b * 256 + block.size] = 127
            continue
        x = (block / a).astype(np.float32)
        dist = np.abs(x[:, None] - book[None, :])  # float32
        codes[b * 256 : b * 256 + block.size] = np.argmin(dist, axis=1)
    return codes.reshape(m32.shape), absmax


def dequantize(codes: np.ndarray, absmax: np.ndarray, book: np.ndarray) -> np.ndarray:
    flat = codes.ravel()
    scale = np.array([absmax[i // 256] for i in range(flat.size)], dtype=np.float64)
    return (book[flat].astype(np.float64) * scale).reshape(codes.shape)


def round_to(values64: np.ndarray, fmt: str) -> np.ndarray:
    """float64 -> float32 -> storage format, returned as float64 values."""
    v32 = values64.astype(np.float32)
    if fmt == "float32":
        return v32.astype(np.float64)
    if fmt == "float16":
        return v32.astype(np.float16).astype(np.float64)
    # bfloat16: keep the top 16 bits with round-half-even, done with integers.
    bits = v32.view(np.uint32).astype(np.uint64)
    low = bits & 0xFFFF
    top = bits >> 16
    up = (low > 0x8000) | ((low == 0x8000) & ((top & 1) == 1))
    top = (top + up.astype(np.uint64)) & 0xFFFF
    return (top.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def ulp(values64: np.ndarray, fmt: str) -> np.ndarray:
    mant = {"float32": 23, "float16": 10, "bfloat16": 7}[fmt]
    tiny = {"float32": 2.0**-149, "float16": 2.0**-24, "bfloat16": 2.0**-133}[fmt]
    exp = np.floor(np.log2(np.maximum(np.abs(values64), 1e-300)))
    return np.maximum(2.0 ** (exp - mant), tiny)


@dataclass
class Spec64State:
    t: int = 0
    skipped: int = 0
    history: np.ndarray | None = None  # float32[100]; None = never recorded
    m: np.ndarray | None = None  # float64 (exact values of what is stored)
    is_8bit: bool = False
    codes: np.ndarray | None = None
    absmax: np.ndarray | None = None
    extras: dict = field(default_factory=dict)


def step(p: np.ndarray, g: np.ndarray, st: Spec64State, hp: dict, fmt: str, book: np.ndarray) -> np.ndarray:
    """One step; p, g given as float64 values of the stored tensors. Returns new p values."""
    p = p.astype(np.float64).ravel()
    g = g.astype(np.float64).ravel()
    if not np.all(np.isfinite(g)):
        if hp.get("nonfinite", "skip") == "skip":
            st.skipped += 1
            return p
    t = st.t + 1
    lr = hp["lr"]
    mu = hp.get("momentum", 0.0)
    delta = hp.get("dampening", 0.0)
    lam = hp.get("weight_decay", 0.0)
    eta = hp.get("trust_coefficient", 0.0)
    eps = hp.get("eps", 1e-8)
    max_unorm = hp.get("max_unorm", 0.02)
    P = hp.get("percentile_clipping", 100)
    g_norm = np.sqrt(np.sum(g * g))
    p_norm = np.sqrt(np.sum(p * p))

    gamma = 1.0
    if P < 100:
        sq = np.float32(g_norm**2)
        if st.history is None:
            st.history = np.full(100, sq, dtype=np.float32)
        st.history[t % 100] = sq
        current = np.sqrt(np.float64(st.history[t % 100]))
        clip = np.sqrt(np.float64(np.sort(st.history)[P]))
        gamma = clip / current if current > clip else 1.0

    d = gamma * g + lam * p
    d_abs = gamma * np.abs(g) + lam * np.abs(p)  # term magnitudes bound float32 rounding
    if eta > 0:
        if p_norm > 0 and g_norm > 0:
            r = eta * p_norm / (gamma * g_norm + lam * p_norm + eps)
        else:
            r = 1.0
        if hp.get("trust_clip", False):
            r = min(r / lr, 1.0) if lr > 0 else 1.0
        d = r * d
        d_abs = r * d_abs

    if mu > 0:
        if t == 1:
            m, m_abs = d.copy(), d_abs
        else:
            m_old = st.m if st.m is not None else np.zeros_like(d)
            m = mu * m_old + (1 - delta) * d
            m_abs = mu * np.abs(m_old) + (1 - delta) * d_abs
        u = d + mu * m if hp.get("nesterov", False) else m
        u_abs = d_abs + mu * m_abs if hp.get("nesterov", False) else m_abs
        if st.is_8bit:
            st.codes, st.absmax = quantize(m.astype(np.float32), book)
            st.m = dequantize(st.codes, st.absmax, book).ravel()
        else:
            st.m = m.astype(np.float32).astype(np.float64)
    else:
        u, u_abs, m_abs = d, d_abs, d_abs

    s = 1.0
    if max_unorm > 0:
        u_norm = np.sqrt(np.sum(u * u))
        if p_norm > 0 and u_norm > max_unorm * p_norm:
            s = max_unorm * p_norm / u_norm
    st.t = t
    st.extras = {
        "update_scale": lr * s * np.max(u_abs, initial=0),
        "m_scale": np.max(m_abs, initial=0),
        "m_raw": m if mu > 0 else None,  # m before quantization
    }
    return round_to(p - lr * s * u, fmt)
