"""Prefect flows over the xcryonet stage functions (see flows.py)."""
