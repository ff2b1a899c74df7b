"""The Python API: `ember.load()` returns an `LLM` with generate() / stream() / chat()."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from ember.config import EngineConfig
from ember.engine.generator import GenerationStats, Generator
from ember.engine.kv_cache import KVCache
from ember.io.bundled import bundled_model_path
from ember.io.source import open_source
from ember.memory import GiB, MemoryEstimate, check_fits, estimate
from ember.models.loader import build_model
from ember.quant.load import quant_hook_for
from ember.sampling_params import SamplingParams

log = logging.getLogger("ember")

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
QUANTIZED = ("ember", "gptq")  # source formats whose linears load as QuantLinear


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from ember.errors import ConfigError

        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible to PyTorch; use --device cpu")
    return dev


def resolve_dtype(name: str | None, device: torch.device, model_dtype: str, quantized: bool = False) -> torch.dtype:
    """The activation dtype: `name` when given; float32 on CPU; on GPU float16 for quantized models (the
    quantized matmul decodes two weights per instruction only for float16 activations, and ExLlamaV2 runs
    them in float16 too), else the model's own 16-bit type."""
    if name is not None:
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # CPU half-precision matmuls are slow or missing
    if quantized:
        return torch.float16
    return torch.bfloat16 if model_dtype == "bfloat16" else torch.float16


def weight_bytes(src, dtype: torch.dtype) -> int:
    """Bytes the weights will take on the device: as stored for quantized folders, else params x dtype."""
    esize = torch.empty(0, dtype=dtype).element_size()
    if src.format in QUANTIZED:
        return sum(src.tensors.nbytes(n) for n in src.tensors.names())
    return src.config.num_parameters() * esize


def memory_estimate(src, dtype: torch.dtype, max_seq_len: int, page_size: int) -> MemoryEstimate:
    """What loading `src` will need (memory.estimate): its weights as they will sit on the device, the KV cache
    for max_seq_len tokens, and the workspace (with the dequantization scratch of quantized models)."""
    return estimate(src.config, weight_bytes(src, dtype), max_seq_len, dtype, page_size,
                    quantized=src.format in QUANTIZED)


class LLM:
    """A loaded model with its tokenizer and a generator. Not thread-safe: one generation at a time."""

    def __init__(self, path: str | Path | None = None, engine: EngineConfig = EngineConfig(), progress: bool = False):
        path = Path(path) if path is not None else bundled_model_path()
        self.source = src = open_source(path)
        self.config = cfg = src.config
        self.device = resolve_device(engine.device)
        self.dtype = resolve_dtype(engine.dtype, self.device, cfg.torch_dtype, src.format in QUANTIZED)
        self.max_seq_len = engine.max_seq_len or min(cfg.max_position_embeddings, 4096)
        if self.max_seq_len > cfg.max_position_embeddings:
            log.warning("max_seq_len %d is beyond the model's trained context (%d)", self.max_seq_len,
                        cfg.max_position_embeddings)
        self.memory = memory_estimate(src, self.dtype, self.max_seq_len, engine.page_size)
        check_fits(self.memory, self.device, self.max_seq_len, engine.memory_limit_gib)
        self.tokenizer = src.tokenizer()
        self.model = build_model(cfg, src.tensors, self.device, self.dtype, self.max_seq_len, where=str(path),
                                 progress=progress, quant_hook=quant_hook_for(src.format, cfg.quantization))
        if engine.fp8_prefill:
            enable_fp8_prefill(self.model, self.device)
        pages = engine.num_pages or -(-self.max_seq_len // engine.page_size)
        self.kv = KVCache(cfg, pages + 1, engine.page_size, self.dtype, self.device)  # +1: decode scratch page
        self.generator = Generator(self.model, self.tokenizer, self.kv, self.max_seq_len, self.device)
        log.info("loaded %s (%s, %s) on %s as %s; weights %.2f GiB, KV cache %.2f GiB", path.name, cfg.architecture,
                 src.format, self.device, str(self.dtype).replace("torch.", ""), self.memory.weights / GiB,
                 self.kv.nbytes / GiB)

    @property
    def stats(self) -> GenerationStats:
        """Numbers of the last generation: tokens, prefill and decode tok/s, peak memory."""
        return self.generator.stats

    def prompt_ids(self, prompt: str | list[dict], raw: bool = False) -> list[int]:
        """A str is wrapped as one user message and rendered with the chat template unless raw=True (then it is
        continued as is); a list of {"role", "content"} messages always goes through the template."""
        if isinstance(prompt, str) and raw:
            return self.tokenizer.encode(prompt)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), add_bos=False)

    def stream(self, prompt: str | list[dict], raw: bool = False, **sampling) -> Iterator[str]:
        """Yields text pieces as they are generated. Keyword arguments are SamplingParams fields."""
        params = SamplingParams.from_kwargs(**sampling)
        for _, text in self.generator.stream_ids(self.prompt_ids(prompt, raw), params):
            if text:
                yield text

    def generate(self, prompt: str | list[dict], raw: bool = False, **sampling) -> str:
        """The whole generated text (without the prompt)."""
        return "".join(self.stream(prompt, raw, **sampling))


def load(path: str | Path | None = None, device: str | None = None, max_seq_len: int | None = None,
         dtype: str | None = None, **engine) -> LLM:
    """Load a model: an HF folder, a GPTQ or ember-quantized folder, or a .gguf file (None: the bundled
    SmolLM2-135M-Instruct). device: "cuda", "cpu" or None (cuda when available)."""
    return LLM(path, EngineConfig(device=device, max_seq_len=max_seq_len, dtype=dtype, **engine))


def enable_fp8_prefill(model, device: torch.device) -> None:
    """EngineConfig.fp8_prefill: switch the quantized linears that allow it to the FP8 many-row path, or say
    why nothing changes."""
    from ember.kernels.qmatmul_fp8 import fp8_gpu_ok
    from ember.layers.quant_linear import set_fp8_prefill

    if not fp8_gpu_ok(device):
        log.warning("fp8_prefill needs a Hopper GPU (sm_90) and CUDA 12.9+; the prompt runs on the 16-bit path")
        return
    able, total = set_fp8_prefill(model, True)
    if total == 0:
        log.warning("fp8_prefill applies to quantized models only; this one is 16-bit")
    else:
        log.info("fp8 prefill: %d of %d quantized linears (the others need widths <= 4 bits, groups of 128)",
                 able, total)
