"""Placeholder: the activation-norm operation registers here."""
