"""The worker's HTTP API: read-side reports and the quote."""
