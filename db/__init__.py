"""The job queue's storage: schema and every queue operation, on SQLite or PostgreSQL."""

from db.engine import DatabaseError, connect, mask_url
from db.queue import Claim, JobQueue, LeaseLost

__all__ = ["Claim", "DatabaseError", "JobQueue", "LeaseLost", "connect", "mask_url"]
