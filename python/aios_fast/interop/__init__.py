"""Bridges between skill cards and other adapter formats (``peft``)."""
