"""Placeholder: the truncated-SVD operations register here."""
