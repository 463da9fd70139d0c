"""Papers and serving engines: the citation for each method and which engines run each saved ``rope_type``.

``PAPERS`` maps the ``paper`` link a method registers (``register_method(..., paper=URL)``) to a title and a BibTeX
entry, which the card's *Citation* section prints; a method whose link is not listed here is cited by its link alone.
``ENGINE_SUPPORT`` maps a ``rope_type`` written to config.json to a sentence saying which serving engines implement
it (the *Limitations* section quotes it). Both are plain data: add an entry when a method or an engine changes.
"""

from __future__ import annotations

from dataclasses import dataclass


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

ENGINE_SUPPORT: dict[str, str] = {
    "default": "only `rope_theta` changed, so every engine that reads `rope_theta` from config.json (transformers, "
    "vLLM, SGLang, TGI, llama.cpp's GGUF conversion) runs it as saved",
    "linear": "`rope_type: linear` is implemented by transformers, vLLM, SGLang, TGI and llama.cpp (GGUF conversion)",
    "dynamic": "`rope_type: dynamic` (dynamic NTK) is implemented by transformers, vLLM and TGI; llama.cpp has no "
    "dynamic scaling",
    "yarn": "`rope_type: yarn` is implemented by transformers, vLLM, SGLang, TGI and llama.cpp (GGUF conversion); "
    "the serving engines apply it at every length, as transformers does",
    "llama3": "`rope_type: llama3` is implemented by transformers, vLLM, SGLang, TGI and llama.cpp (GGUF conversion)",
    "longrope": "`rope_type: longrope` is implemented by transformers and by engines that support Phi-3's LongRoPE "
    "(vLLM, TGI); llama.cpp reads LongRoPE factors for Phi-3 models only",
}
"""rope_type written to config.json -> which serving engines understand it (as of 2025; check the version you run)."""
