"""Transports: how bytes reach a target (local copy, shared memory, TCP), behind one ABC."""
