"""Shared foundations of every Agent2028 service."""
