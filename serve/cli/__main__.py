"""``python -m mixsparse.serve.cli``: how deploy and bench start their servers, with this interpreter."""

import sys

from mixsparse.serve.cli import main

sys.exit(main())
