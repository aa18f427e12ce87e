"""Where klstream keeps a run: the run directory's layout (:mod:`~klstream.storage.rundir`), its
locks (:mod:`~klstream.storage.runlock`), write-then-rename (:mod:`~klstream.storage.atomic`),
every Parquet schema (:mod:`~klstream.storage.schemas`), the answer journal
(:mod:`~klstream.storage.journal`), the shipped SQL (:mod:`~klstream.storage.sqlfiles`) and DuckDB
connections over the run's views (:mod:`~klstream.storage.database`).

Every other package stands on this one; it imports none of them.
"""
