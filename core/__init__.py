"""What every process shares, configured once: the settings read from the environment, the
Temporal client and its data converter, payload encryption, signed links, the program's rules,
its Schedules and the metrics plumbing.

`activities/`, `worker.py` and `starter/` import it; it imports none of them, and `workflows/`
never imports it (workflow code stays free of I/O).

It also holds what the processes read from disk, shipped in the package: the email and page
templates, the translation catalogs, and the program rules used when none are given.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
LOCALE = HERE / "locale"
DEFAULT_PROGRAM = HERE / "program.yaml"
