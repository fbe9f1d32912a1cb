"""Jobs on shared hardware (issue 16): rows in a queue (SQLite WAL under LOFT_HOME), workers that
claim them with a lease and a fencing token, and the kind -> command dispatch table; pipelines of
jobs run stage after stage, and schedules and metric triggers that submit jobs (issue 17).

No torch here (DESIGN.md): a job runs as the loft command a user would type, in its own process.
"""

from loft.jobs.kinds import KINDS
from loft.jobs.store import STATES, TERMINAL, Job, JobStore, job_dir, jobs_root
from loft.jobs.worker import Worker

__all__ = ["KINDS", "STATES", "TERMINAL", "Job", "JobStore", "Worker", "job_dir", "jobs_root"]
