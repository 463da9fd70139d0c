"""hf_rope_ext: extend the context window of HuggingFace transformer models.

    from hf_rope_ext import patch_model
    patch_model(model, method="yarn", factor=4, tokenizer=tok)
"""

__version__ = "0.1.0"

from . import methods as _methods  # noqa: F401,E402  (registers the built-in methods)
from . import serialization as _serialization  # noqa: E402
from .backends import attention_kernel as _attention_kernel  # noqa: E402
from .patching import freeze_rope_length, patch_info, patch_model, unpatch_model  # noqa: E402
from .registry import list_methods, register_method  # noqa: E402
from .search import SearchResult, apply_search_result, search_rope_factors  # noqa: E402

_serialization.register_all()
_attention_kernel.register()  # attn_implementation "hf_rope_ext" / "hf_rope_ext_eager"

__all__ = [
    "patch_model", "unpatch_model", "patch_info", "list_methods", "register_method", "freeze_rope_length",
    "search_rope_factors", "apply_search_result", "SearchResult",
]
