"""Where a study lives: Optuna's journal file under ``LOFT_HOME/studies/NAME.journal`` (the
Optuna FAQ warns against SQLite for concurrent workers; the journal appends under a lock), or a
PostgreSQL database when ``LOFT_STUDIES_URL`` (or ``studies.url`` in LOFT_HOME/settings.yaml) names
one (Optuna's RDB storage, shared by workers on several machines); the study's loft settings are
in its user attribute ``loft``. Trial runs stay under ``LOFT_HOME/studies/NAME``."""

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


def studies_url() -> str | None:
    from loft.core.settings import setting

    url = setting("LOFT_STUDIES_URL", "studies.url")
    return str(url) if url else None


def where(name: str) -> str:
    """The study's storage, for messages and lineage (no password)."""
    from loft.core.settings import redact

    url = studies_url()
    return redact(url) if url else str(journal_path(name))


def storage(name: str) -> Any:
    """The study's storage: the journal file under LOFT_HOME, or the configured database."""
    url = studies_url()
    if url:
        from optuna.storages import RDBStorage

        if url.startswith(("postgresql://", "postgres://")):  # SQLAlchemy's name for psycopg 3
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        try:
            return RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except Exception as e:  # unreachable server, unknown driver: say where and what
            raise ConfigError(
                f"cannot open the study storage {where(name)}: {str(e).splitlines()[0]}",
                hint="Check LOFT_STUDIES_URL (or studies.url in LOFT_HOME/settings.yaml).",
            ) from None
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

    quiet_optuna()
    if studies_url() is None and not journal_path(name).is_file():
        raise ConfigError(f"no study named {name!r} in {studies_dir()}")
    store = storage(name)
    if studies_url() is not None and name not in optuna.get_all_study_names(store):
        raise ConfigError(f"no study named {name!r} in {where(name)}")
    return optuna.load_study(study_name=name, storage=store)


__all__ = [
    "SPEC",
    "journal_path",
    "load_study",
    "quiet_optuna",
    "storage",
    "studies_dir",
    "studies_url",
    "where",
]
