"""SQL persistence: models, sessions and migrations."""

from pacs_node.db.models import Base, DeliveryAttempt, Instance, Job, JobEvent, Output, Series, Study, utcnow
from pacs_node.db.session import Database

__all__ = ["Base", "Database", "DeliveryAttempt", "Output", "Instance", "Job", "JobEvent", "Series", "Study", "utcnow"]
