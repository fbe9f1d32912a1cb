"""Where a study lives: Optuna's journal file under ``LOFT_HOME/studies/NAME.journal`` (the
Optuna FAQ warns against SQLite for concurrent workers; the journal appends under a lock), with
the study's loft settings in its user attribute ``loft``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loft.core.errors import ConfigError
from loft.core.paths import loft_home

SPEC = "loft"  # the study user attribute holding its settings


def studies_dir() -> Path:
    return loft_home() / "studies"


def journal_path(name: str) -> Path:
    return studies_dir() / f"{name}.journal"


def storage(name: str) -> Any:
    """The study's journal-file storage under LOFT_HOME."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    studies_dir().mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(journal_path(name))))


def quiet_optuna() -> None:
    """Optuna's own log says "Trial N failed" with a traceback for a stopped trial; loft says
    what happened to each trial itself."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)


def load_study(name: str) -> Any:
    import optuna

    if not journal_path(name).is_file():
        raise ConfigError(f"no study named {name!r} in {studies_dir()}")
    quiet_optuna()
    return optuna.load_study(study_name=name, storage=storage(name))


__all__ = ["SPEC", "journal_path", "load_study", "quiet_optuna", "storage", "studies_dir"]
