"""Read sweep_qmatmul.py's JSON (--mode small) and print the one launch config with the least summed time over
the swept shapes, as "bn/warps/stages/per_sm" (the EMBER_SMALL_CFG format), with the default's sum beside it.

  python3 scripts/pick_small_cfg.py $OUT/sweep_qmatmul.json
"""
from __future__ import annotations

import collections
import json
import sys

from ember.kernels.qmatmul import DEFAULTS


def main() -> None:
    with open(sys.argv[1]) as f:
        rows = json.load(f)
    total: dict[tuple, float] = collections.defaultdict(float)
    count: dict[tuple, int] = collections.Counter()
    for r in rows:
        total[tuple(r["cfg"])] += r["us"]
        count[tuple(r["cfg"])] += 1
    shapes = max(count.values())
    full = {c: t for c, t in total.items() if count[c] == shapes}
    best = min(full, key=full.get)
    default = tuple(DEFAULTS["small"])
    print(f"{'/'.join(map(str, best))} best {full[best]:.1f} us, default {full.get(default, float('nan')):.1f} us",
          file=sys.stderr)
    print("/".join(map(str, best)))


if __name__ == "__main__":
    main()
