"""The quantization settings the measure stage scores for every linear, and their exact stored sizes.

A candidate is a width mix (fractions of the act-order-sorted inputs, widest first: the inputs with the
largest Hessian diagonal get the most bits), a group size, a Hadamard rotation or none, and symmetric or
asymmetric zero points. `Candidate.spec(K)` turns it into the segments of a K-input matrix: segment
lengths are multiples of 128 (so scale groups never cross a 128-wide GPTQ block), except that a K with a
64 remainder ends in a 64-long piece with groups of 64; the rotation uses blocks of 128 where K allows,
else 64."""
from __future__ import annotations

from dataclasses import dataclass

from ember.quant.gptq import QuantSpec

ALIGN = 128


@dataclass(frozen=True)
class Candidate:
    mix: tuple[tuple[float, int], ...]  # (fraction of inputs, bits), widest first; fractions sum to 1
    group: int  # 32, 64 or 128
    rotate: bool
    asym: bool

    @property
    def name(self) -> str:
        bits = "/".join(f"{b}" for _, b in self.mix) if len(self.mix) > 1 else str(self.mix[0][1])
        frac = "" if len(self.mix) == 1 else "@" + "/".join(f"{f:g}" for f, _ in self.mix[:-1])
        return f"{bits}{frac} g{self.group}{' had' if self.rotate else ''}{' asym' if self.asym else ''}"

    def spec(self, K: int) -> QuantSpec:
        lengths, left = [], K
        for frac, _ in self.mix[:-1]:
            n = min(left - ALIGN, round(frac * K / ALIGN) * ALIGN) if left > ALIGN else 0
            lengths.append(max(0, n))
            left -= lengths[-1]
        lengths.append(left)
        segs: list[tuple[int, int, int]] = []
        for n, (_, bits) in zip(lengths, self.mix):
            if n <= 0:
                continue
            main = n - n % self.group  # a 64 remainder (K % 128 == 64) gets groups of 64
            for k_len, gg in ((main, self.group), (n - main, 64)):
                if k_len:
                    segs.append((k_len, bits, gg))
        return QuantSpec(tuple(segs), had=rotation_block(K) if self.rotate else 0, asym=self.asym)


def _c(mix, group, rotate=True, asym=True) -> Candidate:
    mix = ((1.0, mix),) if isinstance(mix, int) else tuple(mix)
    return Candidate(mix, group, rotate, asym)


def rotation_block(K: int) -> int:
    """The Hadamard block size of a rotated K-input matrix: 128 where K allows, else 64."""
    return 128 if K % 128 == 0 else 64


def _half(hi: int, lo: int, frac: float = 0.5) -> tuple:
    return ((frac, hi), (1 - frac, lo))


# The default set, chosen by measuring SmolLM2-135M's layers (docs/dev/converter-notes.md): the Hadamard
# rotation lowered the error at every width (up to 3x; o_proj about even), asymmetric zeros beat spending
# the same bits on width, groups of 32 were rarely worth their scales, and half/half mixes of neighbouring
# widths filled the gaps between widths. Sorted by size.
CANDIDATES: tuple[Candidate, ...] = (
    _c(2, 128), _c(2, 64), _c(_half(3, 2, 0.25), 128), _c(_half(3, 2), 128),
    _c(3, 128), _c(3, 64), _c(_half(4, 3, 0.25), 128), _c(_half(4, 3), 128),
    _c(4, 128), _c(4, 64), _c(_half(5, 4, 0.25), 128), _c(_half(5, 4), 128),
    _c(5, 128), _c(5, 64), _c(_half(6, 5), 128),
    _c(6, 128), _c(6, 64), _c(_half(8, 6), 128),
    _c(8, 128),
)


def head_candidates(bits: int) -> tuple[Candidate, ...]:
    """Settings tried for the LM head at --head-bits: the lowest Hessian error among them is kept."""
    return (_c(bits, 128), _c(bits, 128, rotate=False), _c(bits, 64), _c(bits, 64, rotate=False),
            _c(bits, 128, asym=False), _c(bits, 64, asym=False))


def min_max_bpw(shapes: list[tuple[int, int]], cands: tuple[Candidate, ...] = CANDIDATES) -> tuple[float, float]:
    """Lowest and highest average bpw reachable over linears of shapes (N, K), weighted by weights."""
    total = sum(n * k for n, k in shapes)
    lo = sum(min(c.spec(k).stored_bits(n) for c in cands) for n, k in shapes)
    hi = sum(max(c.spec(k).stored_bits(n) for c in cands) for n, k in shapes)
    return lo / total, hi / total
