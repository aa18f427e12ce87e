"""``--overwrite`` replaces results; it never deletes them before the new run has something.

Deleting a Model 2's results at the start of an overwrite loses them when the new run cannot
even start (a dead endpoint, a wrong key): they were paid for. So :meth:`Replacement.set_aside`
moves them out of the views' reach, to ``replaced/<model2>/`` (scores and KL table), and the new
run writes into a fresh ``scores/<model2>/``. At its first answer the scoring session calls
:meth:`Replacement.commit`: the old results go, and so do the outputs made from them (the run's
report, an export's ``summary.json``, ``_kl.json`` files and report), so no output is left out of
step with the scores. A run that ends without any answer calls :meth:`Replacement.restore`,
which puts the old results back as they were.

A process killed in between leaves both: :func:`reconcile`, at the start of the next run of that
Model 2, keeps the new results if there are any (the old ones go), else restores the old.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from klstream.storage.journal import holds_records
from klstream.storage.rundir import RunDir


def has_results(run: RunDir, model2: str) -> bool:
    """Whether ``model2`` has results: a part, or answers in the journal."""
    return run.has_scores(model2) or holds_records(run, model2)


def reconcile(run: RunDir, model2: str) -> None:
    """Finish what a killed overwrite left: keep the new results if any, else the old."""
    if not run.replaced_dir(model2).exists():
        return
    if has_results(run, model2):
        shutil.rmtree(run.replaced_dir(model2))
    else:
        Replacement(run, model2).restore()


class Replacement:
    """The results of ``model2`` that an overwrite replaces, and the outputs made from them."""

    def __init__(self, run: RunDir, model2: str, stale_outputs: Sequence[Path] = ()) -> None:
        self.run, self.model2 = run, model2
        self.stale_outputs = [*stale_outputs, run.report]
        """Removed at the commit; a summary first, so an export without one reads as partial."""
        self.committed = False

    def set_aside(self) -> None:
        """Move the results out of the views' reach."""
        run, model2 = self.run, self.model2
        aside = run.replaced_dir(model2)
        aside.mkdir(parents=True, exist_ok=True)
        if run.scores_dir(model2).exists():
            run.scores_dir(model2).rename(run.replaced_scores(model2))
        if run.kl_path(model2).exists():
            run.kl_path(model2).rename(run.replaced_kl(model2))

    def commit(self) -> None:
        """The new run has its first answer: the old results and their outputs go."""
        if self.committed:
            return
        self.committed = True
        shutil.rmtree(self.run.replaced_dir(self.model2), ignore_errors=True)
        for path in self.stale_outputs:
            path.unlink(missing_ok=True)

    def restore(self) -> None:
        """The new run has no answer: put the old results back."""
        run, model2 = self.run, self.model2
        if self.committed or not run.replaced_dir(model2).exists():
            return
        shutil.rmtree(run.scores_dir(model2), ignore_errors=True)
        if run.replaced_scores(model2).exists():
            run.replaced_scores(model2).rename(run.scores_dir(model2))
        run.kl_path(model2).unlink(missing_ok=True)
        if run.replaced_kl(model2).exists():
            run.kl_path(model2).parent.mkdir(parents=True, exist_ok=True)
            run.replaced_kl(model2).rename(run.kl_path(model2))
        shutil.rmtree(run.replaced_dir(model2))
