"""Several ``syncd run`` replicas sharing one PostgreSQL state store."""
