"""The orchestrator: tier routing, the event bus and the integration bridge."""
