"""Model cards for extended checkpoints (moved from ``hf_rope_ext/cards.py``; split by concern next)."""

from .render import *  # noqa: F403
from .render import MARKER_PREFIX, CARD_FILE, TEMPLATE_NAMES  # noqa: F401
