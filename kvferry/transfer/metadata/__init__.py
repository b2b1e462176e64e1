"""Metadata services: how an initiator turns a segment name into an address."""
