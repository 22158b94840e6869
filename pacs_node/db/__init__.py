"""SQL persistence: models, sessions and migrations."""

from pacs_node.db.models import Base, Instance, Job, JobEvent, Series, Study, utcnow
from pacs_node.db.session import Database

__all__ = ["Base", "Database", "Instance", "Job", "JobEvent", "Series", "Study", "utcnow"]
