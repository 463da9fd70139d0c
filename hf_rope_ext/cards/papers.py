"""Papers and serving engines: the citation for each method and which engines run each saved ``rope_type``.

``PAPERS`` maps the ``paper`` link a method registers (``register_method(..., paper=URL)``) to a title and a BibTeX
entry, which the card's *Citation* section prints; a method whose link is not listed here is cited by its link alone.
``ENGINE_SUPPORT`` maps a ``rope_type`` written to config.json to a sentence saying what the tests verified about its
readers, with versions (the *Limitations* section quotes it). Both are plain data: re-check when an engine changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Paper:
    """A paper or post a method comes from."""

    title: str
    bibtex: str


PAPERS: dict[str, Paper] = {
    "https://arxiv.org/abs/2309.00071": Paper(
        "YaRN: Efficient Context Window Extension of Large Language Models (Peng et al., 2023)",
        """@article{peng2023yarn,
  title   = {YaRN: Efficient Context Window Extension of Large Language Models},
  author  = {Peng, Bowen and Quesnelle, Jeffrey and Fan, Honglu and Shippole, Enrico},
  journal = {arXiv preprint arXiv:2309.00071},
  year    = {2023}
}""",
    ),
    "https://arxiv.org/abs/2306.15595": Paper(
        "Extending Context Window of Large Language Models via Positional Interpolation (Chen et al., 2023)",
        """@article{chen2023extending,
  title   = {Extending Context Window of Large Language Models via Positional Interpolation},
  author  = {Chen, Shouyuan and Wong, Sherman and Chen, Liangjian and Tian, Yuandong},
  journal = {arXiv preprint arXiv:2306.15595},
  year    = {2023}
}""",
    ),
    "https://arxiv.org/abs/2104.09864": Paper(
        "RoFormer: Enhanced Transformer with Rotary Position Embedding (Su et al., 2021)",
        """@article{su2021roformer,
  title   = {RoFormer: Enhanced Transformer with Rotary Position Embedding},
  author  = {Su, Jianlin and Lu, Yu and Pan, Shengfeng and Murtadha, Ahmed and Wen, Bo and Liu, Yunfeng},
  journal = {arXiv preprint arXiv:2104.09864},
  year    = {2021}
}""",
    ),
    "https://arxiv.org/abs/2407.21783": Paper(
        "The Llama 3 Herd of Models (Llama Team, AI @ Meta, 2024)",
        """@article{llama3herd2024,
  title   = {The Llama 3 Herd of Models},
  author  = {{Llama Team, AI @ Meta}},
  journal = {arXiv preprint arXiv:2407.21783},
  year    = {2024}
}""",
    ),
    "https://arxiv.org/abs/2402.13753": Paper(
        "LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens (Ding et al., 2024)",
        """@article{ding2024longrope,
  title   = {LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens},
  author  = {Ding, Yiran and Zhang, Li Lyna and Zhang, Chengruidong and Xu, Yuanyuan and Shang, Ning and
             Xu, Jiahang and Yang, Fan and Yang, Mao},
  journal = {arXiv preprint arXiv:2402.13753},
  year    = {2024}
}""",
    ),
    "https://arxiv.org/abs/2004.05150": Paper(
        "Longformer: The Long-Document Transformer (Beltagy et al., 2020)",
        """@article{beltagy2020longformer,
  title   = {Longformer: The Long-Document Transformer},
  author  = {Beltagy, Iz and Peters, Matthew E. and Cohan, Arman},
  journal = {arXiv preprint arXiv:2004.05150},
  year    = {2020}
}""",
    ),
    "https://arxiv.org/abs/1706.03762": Paper(
        "Attention Is All You Need (Vaswani et al., 2017)",
        """@inproceedings{vaswani2017attention,
  title     = {Attention Is All You Need},
  author    = {Vaswani, Ashish and Shazeer, Noam and Parmar, Niki and Uszkoreit, Jakob and Jones, Llion and
               Gomez, Aidan N. and Kaiser, Lukasz and Polosukhin, Illia},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2017}
}""",
    ),
    "https://kexue.fm/archives/7947": Paper(
        "Hierarchical decomposition of position embeddings for long inputs to BERT (Su Jianlin, kexue.fm, 2020)",
        """@misc{su2020hierarchical,
  title        = {{层次分解位置编码，让BERT可以处理超长文本 (hierarchically decomposed position encoding)}},
  author       = {Su, Jianlin},
  year         = {2020},
  howpublished = {\\url{https://kexue.fm/archives/7947}}
}""",
    ),
    "https://www.reddit.com/r/LocalLLaMA/comments/14lz7j5/": Paper(
        "NTK-Aware Scaled RoPE (bloc97, r/LocalLLaMA, 2023)",
        """@misc{bloc97ntk2023,
  title        = {{NTK-Aware Scaled RoPE allows LLaMA models to have extended (8k+) context size without any
                  fine-tuning and minimal perplexity degradation}},
  author       = {bloc97},
  year         = {2023},
  howpublished = {\\url{https://www.reddit.com/r/LocalLLaMA/comments/14lz7j5/}}
}""",
    ),
    "https://www.reddit.com/r/LocalLLaMA/comments/14mrgpr/": Paper(
        "Dynamically Scaled RoPE (emozilla, r/LocalLLaMA, 2023)",
        """@misc{emozilla2023dynamic,
  title        = {{Dynamically Scaled RoPE further increases performance of long context LLaMA with zero fine-tuning}},
  author       = {emozilla},
  year         = {2023},
  howpublished = {\\url{https://www.reddit.com/r/LocalLLaMA/comments/14mrgpr/}}
}""",
    ),
}

TRANSFORMERS5_VERIFIED = "5.24.0"
LEGACY_TRANSFORMERS = "4.57.6"
"""The transformers 4.x release tests/test_serving.py installs and loads saved checkpoints with."""
VLLM_SOURCE = "vLLM 0.33.0 (vllm/config/model.py, _get_and_verify_max_len)"
SGLANG_SOURCE = "SGLang 0.5.23 (sglang/srt/utils/hf_transformers/common.py, get_context_length)"
NOT_VERIFIED = "not verified: running vLLM, SGLang or TGI on the checkpoint (llama.cpp reads a GGUF: see its own line)"
LLAMA_CPP = "llama.cpp as bundled with llama-cpp-python 0.3.36"
"""The llama.cpp tests/test_gguf.py builds (PyPI sdist) and runs, and whose sources the GGUF keys were read in."""
LLAMA_CPP_RUN = {
    "yarn": "loaded by a real llama.cpp in the slow tests (SmolLM2-135M, yarn x2, the Q4_1 GGUF rewritten by "
            "`hf-rope-ext patch`), which reports reading rope scaling yarn, freq_scale 0.5, original length 8192 and "
            "context 16384 from it, and scores 12288 tokens at perplexity 11.27 where transformers gives 11.23 for "
            "the same weights (every 2048-token bucket within 0.5 %; the unextended GGUF collapses past 8k in both); "
            "llama.cpp's own convert_hf_to_gguf.py writes the same yarn keys from config.json",
}
"""llama.cpp's GGUF rope scaling type -> what a real llama.cpp was seen to do with it (tests/test_gguf.py, slow)."""


def llama_cpp_support(folder: Any) -> str:
    """One sentence for the card: whether ``hf-rope-ext export`` can write this saved model as a GGUF llama.cpp runs as
    the same model, how, and what was verified (a real llama.cpp, or llama.cpp's arithmetic re-implemented in the
    tests) -- or why it is refused. Empty for a folder without an hf-rope-ext record."""
    from ..gguf import export_plan

    try:
        _, rope = export_plan(folder)
    except (ValueError, KeyError, TypeError) as err:
        return f"llama.cpp / Ollama: no GGUF export ({err})"
    if rope is None:
        return ""
    how = f"`hf-rope-ext export DIR --format gguf` writes {rope.how}"
    run = LLAMA_CPP_RUN.get(str(rope.values.get(rope.key("rope.scaling.type"))))
    if run and rope.rope_freqs is None:
        return f"llama.cpp / Ollama ({LLAMA_CPP}): {how}; {run}"
    return (f"llama.cpp / Ollama ({LLAMA_CPP}): {how}; the metadata was checked against llama.cpp's arithmetic "
            "re-implemented from its sources (same frequencies and attention factor as transformers); not run in a "
            "real llama.cpp")


def _serving(rope_type: str, length_note: str = "") -> str:
    loads = (
        f"verified by this library's tests on a Llama checkpoint: transformers {TRANSFORMERS5_VERIFIED} and "
        f"transformers {LEGACY_TRANSFORMERS} (which reads the `rope_scaling` / `rope_theta` mirror config.json also "
        f"carries) load `rope_type: {rope_type}` as the same model, with equal logits past the original length"
    )
    length = (
        f"; the served length that {VLLM_SOURCE} and {SGLANG_SOURCE} derive from config.json is the extended length "
        f"(their rule, applied to the saved config){length_note}"
    )
    return loads + length + f"; {NOT_VERIFIED}"


ENGINE_SUPPORT: dict[str, str] = {
    "default": _serving("default") + " (only `rope_theta` changed)",
    "linear": _serving(
        "linear",
        ", because config.json keeps `max_position_embeddings` at the original length and `factor` extends it, "
        "as both engines multiply them for linear scaling",
    ),
    "dynamic": _serving("dynamic", "; `max_position_embeddings` is the original length, as dynamic types read it"),
    "yarn": _serving("yarn"),
    "llama3": _serving("llama3"),
    "longrope": _serving(
        "longrope",
        ", though vLLM's default `max_model_len` for longrope is the top-level `original_max_position_embeddings` "
        "(its Phi-3 rule): pass `--max-model-len` for the full length",
    ),
}
"""rope_type written to config.json -> what the tests verified about its readers (transformers 5 and 4.x load it, the
served length engines derive from it), with versions; what they did not check is said to be not verified."""
