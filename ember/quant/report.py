"""What the converter writes and prints: the output tensors in order, the manifest, the summary table."""
from __future__ import annotations

import torch

from ember.config import ModelConfig
from ember.quant.format import QuantizedTensor
from ember.quant.gptq import BLOCK, DAMP
from ember.quant.quantize import HEAD
from ember.quant.runner import LINEARS

SHORT = {"self_attn.qkv_proj": "qkv", "self_attn.o_proj": "o", "mlp.gate_up_proj": "gate_up",
         "mlp.down_proj": "down"}


def _qt(tensors: dict[str, torch.Tensor], prefix: str) -> QuantizedTensor:
    return QuantizedTensor.from_state_dict(prefix, {k: v for k, v in tensors.items() if k.startswith(prefix + ".")})


def collect_tensors(model, cfg: ModelConfig, qtensors: dict[str, torch.Tensor], head_bits: int) -> dict:
    """Output tensors in file order: embeddings, per layer its norms and packed linears, the final norm,
    the head (packed; fp16 `lm_head.weight` at 16 bits unless tied to the embeddings)."""
    half = lambda t: t.detach().to("cpu", torch.float16).contiguous()
    out = {"model.embed_tokens.weight": half(model.model.embed_tokens.weight)}
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = half(layer.input_layernorm.weight)
        out[f"{p}.post_attention_layernorm.weight"] = half(layer.post_attention_layernorm.weight)
        for n in LINEARS:
            out.update({k: v for k, v in qtensors.items() if k.startswith(f"{p}.{n}.")})
    out["model.norm.weight"] = half(model.model.norm.weight)
    if head_bits != 16:
        out.update({k: v for k, v in qtensors.items() if k.startswith(HEAD + ".")})
    elif not cfg.tie_word_embeddings:
        out["lm_head.weight"] = half(model.lm_head.weight)
    return out


def _entry(qt: QuantizedTensor, error: float, extra: dict) -> dict:
    segs = [[int(r[0]), int(r[1]), int(r[2]), int(r[3])] for r in qt.segments.tolist()]
    return {"shape": [qt.out_features, qt.in_features], "segments": segs, "had": qt.had, "act_order": qt.perm is not None, "zeros": qt.qzeros is not None,
            "bpw": qt.bpw(), "error": error, **extra}


def build_manifest(cfg: ModelConfig, qtensors: dict, qinfo: dict, meas: dict, alloc: dict, head_bits: int,
                   target: float, source: str, calib: dict, block: int = BLOCK) -> dict:
    """ember_quant.json: bpw recounted from the packed tensors; per linear its segments and errors."""
    layers, bits, weights = {}, 0, 0
    measured = {n: {c["name"]: c for c in m["candidates"]} for n, m in meas["linears"].items()}
    predicted_kl = 0.0
    for i in range(cfg.num_layers):
        for n in LINEARS:
            name = f"model.layers.{i}.{n}"
            qt = _qt(qtensors, name)
            cand = alloc["choice"][name]
            m = measured[name][cand]
            layers[name] = _entry(qt, qinfo["errors"][name], {"candidate": cand, "measured_error": m["rel_error"],
                                                             "predicted_kl": m.get("dkl")})
            predicted_kl += m.get("dkl", 0.0)
            bits += qt.stored_bits()
            weights += qt.in_features * qt.out_features
    head_w = cfg.vocab_size * cfg.hidden_size
    if head_bits != 16:
        qt = _qt(qtensors, HEAD)
        layers[HEAD] = _entry(qt, qinfo["errors"][HEAD], {"candidate": qinfo.get("head_candidate")})
        head_bits_stored = qt.stored_bits()
    else:
        head_bits_stored = 16 * head_w
    return {
        "bpw": bits / weights,
        "bpw_total": (bits + head_bits_stored) / (weights + head_w),
        "head_bits": head_bits,
        "target_bpw": target,
        "source": source,
        "calibration": calib,
        "layers": layers,
        "converter": {"method": "gptq", "act_order": True, "damp": DAMP, "block": block,
                      "error": "tr(dW H dW^T) / tr(W H W^T) on the calibration inputs",
                      "predicted_kl": predicted_kl},
    }


def summary(manifest: dict) -> str:
    """A table: per layer the chosen setting of each linear and the layer's bpw; totals and stage times."""
    rows, lines = {}, []
    for name, e in manifest["layers"].items():
        if name == HEAD:
            continue
        i, short = int(name.split(".")[2]), SHORT[name.split(".", 3)[3]]
        rows.setdefault(i, {})[short] = e
    cols = list(SHORT.values())
    w = max([len(e["candidate"]) for r in rows.values() for e in r.values()] + [8])
    lines.append(f"{'layer':>5}  " + "  ".join(f"{c:<{w}}" for c in cols) + "  bpw")
    for i in sorted(rows):
        r = rows[i]
        b = sum(r[c]["bpw"] * _weights(r[c]) for c in cols) / sum(_weights(r[c]) for c in cols)
        lines.append(f"{i:>5}  " + "  ".join(f"{r[c]['candidate']:<{w}}" for c in cols) + f"  {b:.3f}")
    head = manifest["layers"].get(HEAD)
    lines.append(f"decoder bpw {manifest['bpw']:.4f} (target {manifest['target_bpw']:g}), with the head "
                 f"{manifest['bpw_total']:.4f}; head: " +
                 (f"{head['candidate']} ({head['bpw']:.3f} bpw)" if head else "16-bit") +
                 f"; predicted KL of the decoder {manifest['converter']['predicted_kl']:.4f}")
    times = manifest.get("converter", {}).get("times")
    if times:
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    return "\n".join(lines)


def _weights(e: dict) -> int:
    return e["shape"][0] * e["shape"][1]
