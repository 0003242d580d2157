"""Errors that end a run because its numbers cannot be trusted (no torch import: the CLI catches them)."""


class IntegrityError(RuntimeError):
    """The run cannot be trusted (e.g. training changed nothing): stop it, never skip a client for it.

    Engines leave a failing client out of a round; an IntegrityError instead ends the run with
    one line naming the cause (the CLI's exit code 3), since every later number would be wrong.
    """
