import sys

from smpq_edge.cli import main

sys.exit(main())
