"""The agent runtime: write an agent in a few lines (see runtime.py)."""

from clients.agent.faults import FaultPlan
from clients.agent.handlers import ExecutionContext, HandlerError, InvalidArguments
from clients.agent.runtime import Agent

__all__ = ["Agent", "ExecutionContext", "FaultPlan", "HandlerError", "InvalidArguments"]
