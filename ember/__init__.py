"""ember: a GPU-first inference engine for quantized Llama-family models.

    import ember
    llm = ember.load()                       # the bundled SmolLM2-135M-Instruct
    print(llm.generate("Name three colours.", temperature=0))
    for piece in llm.stream("Tell me a story.", max_new_tokens=64):
        print(piece, end="", flush=True)
"""
from ember.llm import LLM, load
from ember.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "load"]
__version__ = "0.1.0"
