"""``python -m worker.cli``: the same as the ``taskman`` script."""

import sys

from worker.cli.main import main

sys.exit(main())
