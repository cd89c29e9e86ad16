"""What every process shares, configured once: the settings read from the environment, the
Temporal client and its data converter, payload encryption, signed links, the program's rules,
its Schedules and the metrics plumbing.

`activities/`, `worker.py` and `starter/` import it; it imports none of them, and `workflows/`
never imports it (workflow code stays free of I/O).
"""
