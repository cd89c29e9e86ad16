"""Pydantic models shared by the workflows, the activities and the entry points, one module
per concept: `values` (the vocabulary), `program` (program.yaml), `referral` (a referral and
what crosses its workflow's boundary) and `ledger` (commissions).

Everything that crosses a boundary (workflow input, query result, update argument, activity
argument, JSON on the CLI) is one of these models, so the shape is checked in one place.
"""
