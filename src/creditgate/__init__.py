"""creditgate: the credit meter of a B2B contact-data platform."""
