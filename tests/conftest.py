"""Test-wide settings.

Under CI (``CI`` set, as ``.ci/run`` runs) Hypothesis draws the same examples on every machine,
so a red run is reproducible and a green one does not depend on the draw; a developer's run keeps
exploring new examples (and a failure it finds goes into the tests as a fixed case).
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")
