"""Model cards for extended checkpoints: ``README.md`` with Hub metadata, what was done, how to load it, results.

Everything the card states about the extension is read from the saved folder's ``config.json`` (its ``hf_rope_ext``
entry, written by ``patch_model``), never from a live model, so the card describes exactly what will be uploaded.
Results are the reports hf_rope_ext writes (chosen by their ``kind``), a ``TrainingSummary``, or the one row format
for results from elsewhere (docs/cards.md).

    from hf_rope_ext.cards import write_card
    write_card("out/smollm2-yarn-16k", results=["ppl.json", "passkey.json"], training="out/smollm2-yarn-16k",
               base_model="HuggingFaceTB/SmolLM2-135M-Instruct", repo_id="me/smollm2-yarn-16k")

Modules, one concern each: ``papers`` (citations, serving-engine support), ``results`` (reading results),
``saved`` (the saved folder, fingerprint and marker), ``format`` (numbers and tables), ``sections`` (the body's
sections), ``metadata`` (front matter), ``render`` (templates, ``render_card`` / ``write_card`` / ``retarget_card``).
"""

from .papers import ENGINE_SUPPORT, PAPERS, Paper
from .render import PLACEHOLDERS, TEMPLATE_NAMES, render_card, retarget_card, template_text, write_card
from .results import ACCEPTED_KINDS, ROWS_KIND, TASKS, UNPATCHED_LABEL, Plot, Results, ScoreRow, load_results
from .saved import CARD_FILE, MARKER_PREFIX, SavedModel, fingerprint, read_marker, read_model_id

__all__ = [
    "render_card", "write_card", "retarget_card", "load_results", "Results", "ScoreRow", "Plot", "SavedModel",
    "fingerprint", "read_marker", "read_model_id", "template_text", "PAPERS", "Paper", "ENGINE_SUPPORT",
    "TEMPLATE_NAMES", "PLACEHOLDERS", "CARD_FILE", "MARKER_PREFIX", "ACCEPTED_KINDS", "ROWS_KIND", "TASKS",
    "UNPATCHED_LABEL",
]
