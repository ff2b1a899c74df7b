"""The decode-step timeline helpers of scripts/profile_graph.py and scripts/gemv_in_decode.py on made-up kernel
records (CPU): the repeated layer window is found wherever the step's preamble ends, and each layer position is
mapped to the right matmul."""
from types import SimpleNamespace as NS

import pytest

from scripts.gemv_in_decode import matmul_rows
from scripts.profile_graph import position_means, step_table

LAYER = ["_decode_kernel", "qmatmul_kernel", "qmatmul_kernel", "qmatmul_kernel", "qmatmul_kernel"]


def fake_profile(preamble: list[str], layers: int, steps: int):
    """Kernel records of `steps` decode steps: preamble, layer 0's qkv, `layers` x (attention, o, gate/up, down,
    next qkv) with the last layer's qkv replaced by the final norm, then the head and the greedy pick. Kernel k
    of a step lasts 10 + k us and ends 3 us after the previous one ends."""
    names = [*preamble, "qmatmul_kernel", *LAYER * (layers - 1), *LAYER[:4], "_rms_norm_kernel", "qmatmul_kernel",
             "_greedy_kernel"]
    ev = []
    for s in range(steps):
        end = s * 10_000.0
        for k, n in enumerate(names):
            end += 3.0
            ev.append(NS(name=n, device_type=NS(name="CUDA"), time_range=NS(start=end - 10 - k, end=end)))
    return NS(events=lambda: ev), names


@pytest.mark.parametrize("preamble", [["_prepare_kernel"], ["_prepare_kernel", "fill", "fill", "_rms_norm_kernel"]])
def test_layer_window_and_matmul_mapping(preamble):
    prof, names = fake_profile(preamble, 6, 4)
    t = step_table(prof, 4)
    assert t["period"] == 5 and t["layers"] == 6 and t["per"] == len(names)
    assert t["i0"] == len(preamble)  # the window starts at layer 0's qkv: 6 whole windows, not 5
    assert all(a == 3.0 for a in t["A"][1:]) and t["D"][2] == 12.0
    means = position_means(t)
    assert [round(d, 6) for d, _, _ in means][:2] == [10 + t["i0"] + 12.5, 11 + t["i0"] + 12.5]  # mean over layers

    def lin(k, n):
        return NS(in_features=k, out_features=n, qt=NS(stored_bits=lambda: 8 * k * n))

    layer = NS(self_attn=NS(qkv_proj=lin(64, 96), o_proj=lin(64, 64)), mlp=NS(gate_up_proj=lin(64, 256),
                                                                              down_proj=lin(128, 64)))
    rows = matmul_rows(NS(model=NS(layers=[layer, layer]), lm_head=lin(64, 1000)), t)  # as LlamaForCausalLM
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [("o", 64, 64, 64 * 64), ("gate/up", 64, 256, 64 * 256),
                                                        ("down", 128, 64, 128 * 64), ("qkv", 64, 96, 64 * 96),
                                                        ("head", 64, 1000, 64 * 1000)]
    assert all(r[3] == 3.0 for r in rows)
