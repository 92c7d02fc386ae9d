"""The job store: uploaded files, batches, their lines and results, API keys and usage (SQLite, WAL).

A store per concern (`files`, `batches`, `lines`, `results`, `keys`, `usage`), each
returning typed rows, over one database that the API process and `hotq submit` share
(`database`). File contents live on disk under ``<data_dir>/files/``. The OpenAI
objects made of these rows are drawn in `broker.openai_objects`.
"""

from broker.jobstore.batches import ACTIVE_STATUSES, BATCH_STATUSES, TERMINAL_STATUSES, BatchRow
from broker.jobstore.database import new_id
from broker.jobstore.files import FileRow
from broker.jobstore.keys import ANONYMOUS_USER, API_KEY_PREFIX, ApiKey, hash_api_key
from broker.jobstore.lines import Line, LineOwner, Unfinished
from broker.jobstore.results import Result
from broker.jobstore.store import AsyncJobStore, JobStore
from broker.jobstore.usage import UsageTotal, since_day

__all__ = [
    "ACTIVE_STATUSES",
    "ANONYMOUS_USER",
    "API_KEY_PREFIX",
    "BATCH_STATUSES",
    "TERMINAL_STATUSES",
    "ApiKey",
    "AsyncJobStore",
    "BatchRow",
    "FileRow",
    "JobStore",
    "Line",
    "LineOwner",
    "Result",
    "Unfinished",
    "UsageTotal",
    "hash_api_key",
    "new_id",
    "since_day",
]
