"""`python -m bench.gpu`: see bench/gpu/run.py."""

import sys

from bench.gpu.run import main

sys.exit(main())
