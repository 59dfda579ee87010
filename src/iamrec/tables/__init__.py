"""The top floor: whole tables and GPU sittings, split by job.

- `plan`: the tables' cells, the profiles layered over them, their configs resolved by the CLIs' own
  parser, the commands of each cell-seed, and `TableRun` (one run's settings);
- `runner`: running the cell-seeds of a `TableRun` (resume, reuse, budget, side by side);
- `report`: the only writer of a table's ``<out>.md``/``.csv``/``.png`` and of the configs' ``# Measured``
  lines;
- `sitting`: the steps of one GPU sitting (`python -m iamrec.session run`);
- `archive`: a sitting's archive, packed and merged.

The command lines are `python -m iamrec.reproduce` and `python -m iamrec.session`.
"""
