"""The consensus service: Byzantine-tolerant voting among agent processes."""
