"""Email jobs: one message (send_email) or a newsletter fanned out to one job per recipient."""

from jobs.mail.email import send_email
from jobs.mail.newsletter import send_newsletter

__all__ = ["send_email", "send_newsletter"]
