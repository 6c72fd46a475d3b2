"""The scoring worker: consume frames, score them, route decisions, commit."""
