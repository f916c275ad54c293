"""``python -m finetune`` (also what ``accelerate launch -m finetune`` runs)."""

import sys

from finetune.cli import main

sys.exit(main())
