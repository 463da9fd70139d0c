"""The sections of a card's body, each built from the saved config, the results and the method's registration.

One function per template placeholder: ``extension_table`` (what was done), ``parameters_table`` (every method
parameter with its meaning), ``position_config`` (the exact position fields of config.json), ``evaluation_section``
(perplexity and retrieval tables by length, this model first, then what it was compared with; plots),
``training_section`` (the ``TrainingSummary`` field by field, each explained by its dataclass help), ``limitations``
(what a user must know for this method, config and architecture) and ``citation``. They return Markdown and never
touch files.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from ..training.summary import TrainingSummary
from .format import fmt_acc, fmt_bytes, fmt_count, fmt_duration, fmt_factor, fmt_ppl, fmt_value, group, mean, table
from .papers import ENGINE_SUPPORT, PAPERS, llama_cpp_support
from .results import UNPATCHED_LABEL, Plot, Results, ScoreRow, is_this_model
from .saved import HUB_ID, SavedModel


def param_help(cls: type) -> dict[str, str]:
    """Meaning of each field of a method's parameter dataclass: its ``metadata["help"]`` (``registry.param``)."""
    if not dataclasses.is_dataclass(cls):
        return {}
    return {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if f.metadata.get("help")}


def method_spec(name: str) -> Any:
    from .. import registry

    return registry.METHODS.get(name)


def task_and_pipeline(saved: SavedModel) -> tuple[str, str, str]:
    """(template name, pipeline tag, Auto class) from the saved architectures."""
    archs = saved.architectures
    suffixes = [
        (("ForCausalLM", "LMHeadModel"), "text-generation", "AutoModelForCausalLM"),
        (("ForMaskedLM",), "fill-mask", "AutoModelForMaskedLM"),
        (("ForSequenceClassification",), "text-classification", "AutoModelForSequenceClassification"),
        (("ForTokenClassification",), "token-classification", "AutoModelForTokenClassification"),
        (("ForQuestionAnswering",), "question-answering", "AutoModelForQuestionAnswering"),
    ]
    for ends, tag, auto in suffixes:
        if any(a.endswith(ends) for a in archs):
            return ("causal_lm" if tag == "text-generation" else "encoder"), tag, auto
    if (saved.folder / "modules.json").is_file() or (saved.folder / "sentence_bert_config.json").is_file():
        return "encoder", "sentence-similarity", "AutoModel"
    return "encoder", "feature-extraction", "AutoModel"


def extension_table(saved: SavedModel, base_model: str | None, spec: Any) -> str:
    meta = saved.meta
    method = meta["method"]
    paper = meta.get("paper") or getattr(spec, "paper", "")
    rows = []
    if base_model:
        link = f"[{base_model}](https://huggingface.co/{base_model})" if HUB_ID.match(base_model) else base_model
        rows.append(("base model", link))
    method_text = f"`{method}`" + (f" — {spec.description}" if spec is not None else "")
    rows.append(("method", method_text))
    if paper:
        rows.append(("paper", f"[{PAPERS[paper].title if paper in PAPERS else paper}]({paper})"))
    rows.append(("original context", f"{meta['original_max_position_embeddings']} tokens"))
    rows.append(("extended context", f"{meta['max_position_embeddings']} tokens"))
    rows.append(("factor", f"{fmt_factor(meta.get('factor'))}×"))
    kind = meta.get("kind", "rope")
    rows.append((
        "position encoding",
        {
            "rope": "rotary (RoPE)",
            "absolute": "learned position table",
            "attention": "rotary (RoPE), original frequencies; relative positions changed in attention",
        }.get(kind, kind),
    ))
    if meta.get("attention"):
        rows.append(("attention implementation", f"`{meta['attention']['implementation']}` (hf_rope_ext)"
                     + (", with log-n query scaling" if (meta.get("parameters") or {}).get("logn") else "")))
    written = meta.get("rope_parameters_written")
    if written:
        text = ", ".join(
            f"`{t}`" if k in ("None", None) else f"{k}: `{t}`" for k, t in written.items()
        )
        rows.append(("rope_type in config.json", text))
    if meta.get("layer_types"):
        rows.append(("layer types rescaled", ", ".join(map(str, meta["layer_types"]))))
    rows.append(("frequencies depend on input length", "yes (dynamic)" if meta.get("dynamic") else "no (static)"))
    rows.append((
        "loads in stock transformers",
        "no — `import hf_rope_ext` first" if meta.get("requires_plugin") else "yes (native config)",
    ))
    if meta.get("library_version"):
        rows.append(("hf_rope_ext version", meta["library_version"]))
    return table(["", ""], rows)


def parameters_table(saved: SavedModel, spec: Any) -> str:
    meta = saved.meta
    docs = param_help(spec.params_cls) if spec is not None else {}
    rows = [
        ("factor", fmt_factor(meta.get("factor")),
         docs.get("factor", "new context length / original context length")),
        ("original_max_position_embeddings", meta["original_max_position_embeddings"],
         docs.get("original_max_position_embeddings", "context length the model was pre-trained at")),
    ]
    for name, value in (meta.get("parameters") or {}).items():
        rows.append((name, "None (method default)" if value is None else fmt_value(value), docs.get(name, "")))
    text = table(["parameter", "value", "meaning"], [(f"`{n}`", v, d) for n, v, d in rows])
    search = search_paragraph(meta.get("search"))
    return f"{text}\n\n{search}" if search else text


def search_paragraph(search: Any) -> str:
    """How the factors were found, from ``hf_rope_ext["search"]`` (written by ``hf_rope_ext.apply_search_result``):
    objective, evaluations, texts, and the validation figures. Empty when the model was not searched."""
    if not isinstance(search, Mapping):
        return ""
    dims = search.get("searched_dims") or []
    dims_text = f"dimensions {dims[0]}–{dims[-1]}" if dims else "all dimensions"
    lines = [
        f"The per-dimension factors were found by LongRoPE's evolutionary search "
        f"([Ding et al. 2024]({search.get('paper', 'https://arxiv.org/abs/2402.13753')})) with hf-rope-ext: "
        f"objective `{search.get('objective')}` at {search.get('eval_length')} tokens on "
        f"{', '.join(f'`{t}`' for t in search.get('texts') or []) or 'the search texts'}, "
        f"{search.get('evaluations')} evaluations ({fmt_duration(float(search.get('seconds') or 0))}), seed "
        f"{search.get('seed')}, {dims_text} searched"
        + (f" and the attention factor (best {float(search['attention_factor']):.4f})"
           if search.get("attention_searched") and "attention_factor" in search else "")
        + f"; best NLL {float(search.get('score_nll', float('nan'))):.4f}."
    ]
    rows = search.get("validation") or []
    if rows:
        lines.append("")
        lines.append("Validation on texts not used in the search (perplexity, lower is better):")
        lines.append("")
        lines.append(table(
            ["text", "method", "length", "PPL whole window", "PPL past the original length"],
            [(f"`{r.get('text')}`", r.get("method"), r.get("length"), fmt_ppl(r.get("ppl_window")),
              fmt_ppl(r.get("ppl_beyond"))) for r in rows],
        ))
    return "\n".join(lines)


_POSITION_CONFIG_KEYS = (
    "rope_parameters", "rope_scaling", "rope_theta", "max_position_embeddings", "original_max_position_embeddings",
    "n_positions", "n_ctx", "max_seq_len", "seq_length",
)


def position_config(saved: SavedModel) -> str:
    fields = {k: saved.config[k] for k in _POSITION_CONFIG_KEYS if k in saved.config}
    return json.dumps(fields, indent=2, sort_keys=False, default=str)


def _ordered_methods(rows: list[ScoreRow], this_method: str) -> list[str | None]:
    labels: list[str | None] = []
    for r in rows:
        if r.method not in labels:
            labels.append(r.method)
    return sorted(labels, key=lambda m: (not is_this_model(m, this_method), labels.index(m)))


def _column_name(label: str | None, this_method: str) -> str:
    if label is None:
        return "this model"
    if label == UNPATCHED_LABEL:
        return f"{label} (not extended)"
    return f"{label} (this model)" if is_this_model(label, this_method) else label


def _perplexity_section(rows: list[ScoreRow], meta: Mapping[str, Any]) -> str:
    original = meta["original_max_position_embeddings"]
    parts = []
    for dataset, drows in group(rows, lambda r: r.dataset).items():
        methods = _ordered_methods(drows, meta["method"])
        lengths = sorted({r.length for r in drows})
        cells = {(r.method, r.length): r.value for r in drows}
        grid = table(
            ["tokens", "× original", *[_column_name(m, meta["method"]) for m in methods]],
            [
                [length, f"{length / original:g}", *[fmt_ppl(cells[(m, length)]) if (m, length) in cells else "–"
                                                     for m in methods]]
                for length in lengths
            ],
            ["--:", "--:", *["--:"] * len(methods)],
        )
        parts.append((f"On {dataset}:\n\n" if dataset else "") + grid)
    return "\n\n".join(parts)


def _accuracy_section(rows: list[ScoreRow], meta: Mapping[str, Any]) -> str:
    """Accuracy by length (mean over depths) per method, then a depth x length grid per method where depths vary."""
    original = meta["original_max_position_embeddings"]
    methods = _ordered_methods(rows, meta["method"])
    lengths = sorted({r.length for r in rows})
    by_cell = group(rows, lambda r: (r.method, r.length))

    def summary(m: str | None, length: int) -> str:
        cell = by_cell.get((m, length))
        if not cell:
            return "–"
        if all(r.trials for r in cell):  # weighted by trials; counts are exact
            trials = sum(r.trials for r in cell)
            return fmt_acc(sum(r.value * r.trials for r in cell) / trials, trials)
        if len(cell) > 1 and all(r.value in (0.0, 1.0) for r in cell):  # one trial per row (e.g. per depth)
            return fmt_acc(mean([r.value for r in cell]), len(cell))
        return fmt_acc(mean([r.value for r in cell]))

    parts = [table(
        ["tokens", "× original", *[_column_name(m, meta["method"]) for m in methods]],
        [[length, f"{length / original:g}", *[summary(m, length) for m in methods]] for length in lengths],
        ["--:", "--:", *["--:"] * len(methods)],
    )]
    for m in methods:
        mrows = [r for r in rows if r.method == m and r.depth is not None]
        depths = sorted({r.depth for r in mrows})
        if len(depths) < 2:
            continue
        cells = group(mrows, lambda r: (r.depth, r.length))
        mlengths = sorted({r.length for r in mrows})
        grid = table(
            ["depth", *[str(length) for length in mlengths]],
            [
                [f"{100 * d:.0f}%", *[
                    fmt_acc(mean([r.value for r in cells[(d, length)]])) if (d, length) in cells else "–"
                    for length in mlengths
                ]]
                for d in depths
            ],
            ["--:", *["--:"] * len(mlengths)],
        )
        parts.append(f"Accuracy by depth (rows) and context length (columns), {_column_name(m, meta['method'])}:\n\n"
                     + grid)
    return "\n\n".join(parts)


def plot_links(plots: list[Plot]) -> str:
    return "\n\n".join(f"![{p.title}]({p.path.as_posix()})" for p in plots)


def evaluation_section(results: Results, meta: Mapping[str, Any], plots: list[Plot]) -> str:
    parts = []
    titles = {
        "perplexity": ("Perplexity by context length", "lower is better"),
        "passkey": ("Passkey retrieval accuracy", "fraction of trials where the model repeated the hidden key"),
        "needle": ("Needle-in-a-haystack accuracy", "fraction of trials where the needle was retrieved"),
    }
    for task, (title, note) in titles.items():
        rows = results.of(task)
        task_plots = [p for p in plots if p.task == task]
        if not rows and not task_plots:
            continue
        body = _perplexity_section(rows, meta) if task == "perplexity" and rows else (
            _accuracy_section(rows, meta) if rows else "")
        parts.append("\n\n".join(x for x in (f"### {title}", f"*{note}*" if rows else "", body,
                                             plot_links(task_plots)) if x))
    other = [p for p in plots if p.task not in titles and p.task != "training"]
    if other:
        parts.append("### Plots\n\n" + plot_links(other))
    if not parts:
        return (
            "## Evaluation\n\nNo evaluation results were supplied when this card was written. Measure perplexity and "
            f"retrieval at the lengths you need (up to {meta['max_position_embeddings']} tokens) before relying on "
            "them."
        )
    return "## Evaluation\n\n" + "\n\n".join(parts)


def _loss_curve_text(curve: list[list[float]]) -> str:
    (s0, l0), (s1, l1) = curve[0][:2], curve[-1][:2]
    return f"{l0:.4g} (step {s0:g}) → {l1:.4g} (step {s1:g}), {len(curve)} points"


def _held_out_text(result: Mapping[str, Any]) -> str:
    text = f"perplexity {fmt_ppl(float(result['perplexity']))}"
    if result.get("length"):
        text += f" at {result['length']} tokens"
    extras = [f"{result['chunks']} chunks" if result.get("chunks") else "",
              f"{result['tokens']:,} tokens scored" if isinstance(result.get("tokens"), int) else "",
              f"{result['objective']} objective" if result.get("objective") else ""]
    return text + (f" ({', '.join(x for x in extras if x)})" if any(extras) else "")


def _listing(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else fmt_value(value)


def _data_listing(value: Any) -> str:
    """Training sources; a local absolute path shows its file name only (a card is published: the folder layout of
    the machine that trained it is neither useful to readers nor theirs to see)."""
    items = value if isinstance(value, list) else [value]
    shown = [f"{PurePath(v).name} (local file)" if isinstance(v, str) and PurePath(v).is_absolute() else v
             for v in items]
    return _listing(shown if isinstance(value, list) else shown[0])


_TRAINING_FORMAT: dict[str, Any] = {
    "factor": fmt_factor,
    "data": _data_listing,
    "tokens": fmt_count,
    "wall_time_s": fmt_duration,
    "tokens_per_s": lambda v: f"{v:,.0f} tokens/s",
    "peak_memory_bytes": fmt_bytes,
    "peak_rss_bytes": fmt_bytes,
    "loss_first": lambda v: f"{v:.4g}",
    "final_loss": lambda v: f"{v:.4g}",
    "loss_curve": _loss_curve_text,
    "lora": lambda v: "; ".join(f"{k}={_listing(x)}" for k, x in v.items() if x not in (None, [], {}))
    if isinstance(v, Mapping) else fmt_value(v),
    "eval_before": _held_out_text,
    "eval_after": _held_out_text,
}
"""TrainingSummary field -> how its value is written; other fields use ``fmt_value``."""
_TRAINING_ELSEWHERE = ("extension", "options", "plots")
"""Fields not in the table: the card describes the extension itself; options go in a folded block; plots are shown."""


def training_rows(summary: TrainingSummary) -> list[tuple[str, str, str]]:
    """(field, value, meaning) for every recorded field of the summary, in the dataclass's order; the meaning is the
    field's help (``TrainingSummary.field_help()``)."""
    help = summary.field_help()
    rows = []
    for f in dataclasses.fields(summary):
        value = getattr(summary, f.name)
        if f.name in _TRAINING_ELSEWHERE or value is None or value == [] or value == {}:
            continue
        rows.append((f.name, _TRAINING_FORMAT.get(f.name, fmt_value)(value), help.get(f.name, "")))
    return rows


def training_section(results: Results, plots: list[Plot]) -> str:
    training_plots = [p for p in plots if p.task == "training"]
    summary = results.training
    if summary is None and not training_plots:
        return ("## Fine-tuning\n\nNo training summary was supplied with this card. If the checkpoint was not "
                "fine-tuned after patching, its quality beyond the original context rests on the method alone.")
    parts = ["## Fine-tuning"]
    if summary is not None:
        parts.append(table(["field", "value", "meaning"], [(f"`{n}`", v, m) for n, v, m in training_rows(summary)]))
        if summary.eval_before and summary.eval_after:
            parts.append("The held-out perplexity before and after training is also in the perplexity table under "
                         "*Evaluation*.")
        if summary.options:
            options = json.dumps(summary.options, indent=2, sort_keys=True, default=str)
            parts.append(f"<details><summary>Full training configuration</summary>\n\n```json\n{options}\n```\n\n"
                         "</details>")
    if training_plots:
        parts.append(plot_links(training_plots))
    return "\n\n".join(parts)


def _kv_cache_bytes_per_token(config: Mapping[str, Any]) -> int | None:
    """Keys + values per token across layers in 16-bit: 2 * layers * kv_heads * head_dim * 2 bytes."""
    if "kv_lora_rank" in config:  # MLA caches a compressed latent: the formula does not apply
        return None
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    heads = config.get("num_attention_heads") or config.get("n_head")
    kv_heads = config.get("num_key_value_heads") or config.get("num_kv_heads") or heads
    hidden = config.get("hidden_size") or config.get("n_embd")
    head_dim = config.get("head_dim") or (hidden // heads if hidden and heads else None)
    if not all(isinstance(x, int) and x > 0 for x in (layers, kv_heads, head_dim)):
        return None
    return 2 * layers * kv_heads * head_dim * 2


def limitations(saved: SavedModel, template: str, results: Results) -> list[str]:
    meta, config = saved.meta, saved.config
    original, new = meta["original_max_position_embeddings"], meta["max_position_embeddings"]
    items = [
        f"The model was pre-trained on sequences of at most {original} tokens. Beyond that, quality comes from the "
        f"`{meta['method']}` extension" + (" and the fine-tuning described above." if results.training else
                                           "; no fine-tuning summary accompanies this card.")
    ]
    measured = [r.length for r in results.rows]
    if measured and max(measured) < new:
        items.append(f"Evaluations above reach {max(measured)} tokens; lengths from {max(measured)} to {new} tokens "
                     "were not measured.")
    elif not measured:
        items.append("No evaluation results are included with this card.")
    if meta.get("dynamic"):
        items.append(
            "Dynamic scaling: the frequencies are recomputed from the current sequence length once it exceeds "
            f"{original} "
            "tokens, so up to that length the model behaves exactly like the base model, and padding a batch to a "
            "longer length changes the outputs of its shorter sequences. config.json keeps `max_position_embeddings` "
            f"at {saved.config.get('max_position_embeddings')} because transformers' dynamic types read it as the "
            "original length."
        )
        if template == "causal_lm":
            items.append(
                "Dynamic scaling and the KV cache: while generating, keys cached at shorter lengths stay rotated with "
                "the earlier frequencies as the frequencies change. For outputs identical to a forward pass over the "
                "final text, hold the frequencies fixed for the whole generation: `from hf_rope_ext import "
                "freeze_rope_length` and `with freeze_rope_length(model, prompt_len + max_new_tokens): "
                "model.generate(...)`. Serving engines each handle this their own way."
            )
    written = {str(t) for t in (meta.get("rope_parameters_written") or {}).values()}
    attention = meta.get("attention")
    if attention:
        name = attention["implementation"]
        items.append(
            f"Attention: config.json sets `attn_implementation: {name}`, the attention function hf_rope_ext "
            "registers. `import hf_rope_ext` before `from_pretrained` gives the extended model; without the plugin "
            "transformers refuses to load it (unknown attention implementation / rope type) rather than load "
            "something else. `hf_rope_ext.unpatch_model(model)` after loading gives the original model."
        )
        if meta.get("kind") == "attention":
            items.append(
                "Serving engines (vLLM, SGLang, TGI, llama.cpp) do not know the rope type "
                "`hf_rope_ext_attention` and refuse this config; the extension runs only in transformers with the "
                f"plugin. Below {attention.get('exact_below', '?')} tokens the model is exactly the base model, so "
                "engines can serve the base checkpoint for short inputs."
            )
        else:
            items.append("Serving engines ignore `attn_implementation`: they run the rope scaling below without the "
                         "log-n query scaling.")
    if meta.get("requires_plugin") and not attention:
        types = ", ".join(f"`{t}`" for t in sorted(written)) or "its rope type"
        items.append(
            f"config.json names {types}, which only exists once `import hf_rope_ext` has run (hf_rope_ext "
            f"{meta.get('library_version', '')}+). Without it transformers cannot build the model, and serving "
            "engines (vLLM, SGLang, TGI, llama.cpp) do not know this rope type: serve it through transformers with "
            "the plugin imported, or re-patch with a method that saves natively."
        )
    else:
        for rope_type in sorted(written):
            if rope_type in ENGINE_SUPPORT:
                items.append(f"Serving: {ENGINE_SUPPORT[rope_type]}. Check the engine version you deploy.")
        if meta.get("kind") == "rope" and (line := llama_cpp_support(saved.folder)):
            items.append(line + ".")
        if meta.get("kind") == "absolute":
            items.append("Serving: the position table itself was resized, so every engine that loads the weights "
                         "runs the extended model as saved.")
    legacy = meta.get("transformers4")
    if isinstance(legacy, Mapping) and legacy.get("expressed") is False:
        items.append(f"transformers 4.x: not expressed in config.json for this model ({legacy.get('reason', '')}).")
    rope = config.get("rope_parameters") or {}
    if isinstance(rope, Mapping) and rope.get("rope_type") == "longrope" and rope.get("short_factor") == rope.get(
            "long_factor") and rope.get("short_factor") is not None:
        items.append("The rescale is stored as `longrope` with `short_factor == long_factor`, so the same frequencies "
                     "apply at every length.")
    if meta.get("layer_types"):
        items.append(f"Only the layer types {', '.join(map(str, meta['layer_types']))} were rescaled; the other "
                     "layers keep their original positions (e.g. local sliding-window attention).")
    tok_max = saved.tokenizer_config.get("model_max_length")
    if isinstance(tok_max, int) and tok_max < new:
        items.append(f"tokenizer_config.json sets `model_max_length` to {tok_max} (< {new}): the tokenizer truncates "
                     "or warns below the new length unless you pass `max_length`.")
    st_path = saved.folder / "sentence_bert_config.json"
    if st_path.is_file():
        st_max = json.loads(st_path.read_text(encoding="utf-8")).get("max_seq_length")
        if isinstance(st_max, int) and st_max < new:
            items.append(f"sentence_bert_config.json sets `max_seq_length` to {st_max}: sentence-transformers "
                         f"truncates inputs there; raise it to use up to {new} tokens.")
    per_token = _kv_cache_bytes_per_token(config) if template == "causal_lm" else None
    if per_token:
        items.append(f"Memory: the KV cache takes {fmt_bytes(per_token)} per token in 16-bit precision, "
                     f"{fmt_bytes(per_token * new)} for one {new}-token sequence; attention cost grows with length.")
    elif template == "encoder":
        items.append(f"Memory and time of self-attention grow quadratically with input length; at {new} tokens a "
                     f"forward pass costs about {(new / original) ** 2:g}× the attention compute of a "
                     f"{original}-token input.")
    return items


def citation(meta: Mapping[str, Any], spec: Any) -> str:
    paper = meta.get("paper") or getattr(spec, "paper", "")
    parts = []
    if paper in PAPERS:
        parts.append(f"The `{meta['method']}` method: {PAPERS[paper].title}, {paper}\n\n```bibtex\n"
                     f"{PAPERS[paper].bibtex}\n```")
    elif paper:
        parts.append(f"The `{meta['method']}` method: {paper}")
    else:
        parts.append(f"The `{meta['method']}` method registers no paper link.")
    parts.append(f"Extended with hf_rope_ext {meta.get('library_version', '')}".rstrip() + ".")
    return "\n\n".join(parts)


