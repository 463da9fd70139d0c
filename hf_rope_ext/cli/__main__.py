"""``python -m hf_rope_ext.cli`` = ``hf-rope-ext``."""

import sys

from . import main

sys.exit(main())
