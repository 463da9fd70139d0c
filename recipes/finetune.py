"""The fine-tune recipe, run from a clone: ``python recipes/finetune.py --config FILE`` or
``accelerate launch recipes/finetune.py --config FILE``.

The recipe itself lives in the package, :mod:`hf_rope_ext.recipes.finetune` (installed with ``pip install``, run as
``hf-rope-ext finetune`` or ``accelerate launch -m hf_rope_ext.recipes.finetune``); this file calls its ``main``.
Its public names are re-exported, so scripts that load this file by path still find ``run``, ``options_from_dict``...
"""

import sys

from hf_rope_ext.recipes.finetune import *  # noqa: F403
from hf_rope_ext.recipes.finetune import main

if __name__ == "__main__":
    sys.exit(main())
