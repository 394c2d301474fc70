"""Placeholder: this module's policies are being written (see the open issues)."""

__all__: list[str] = []
