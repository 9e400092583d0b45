"""Numpy operations on batches of packets (batch.py): checksums, GSO split (gso.py), GRO coalesce (gro.py),
validation with named drop reasons (parse.py, drops.py); reference.py holds their per-packet twins."""
