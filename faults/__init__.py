"""Fault-injection suite: real Temporal dev server, worker process, database and SMTP server,
with faults injected while referrals are mid-flight, then checked for loss and duplication.

Run with `python -m faults` (see `faults.__main__`). Nothing here is imported by the product.
"""
