"""The Agent2028 services, one package each, over services.common."""
