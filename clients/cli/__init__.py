"""The agent2028 command line (typer + rich)."""
