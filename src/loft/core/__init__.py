"""Errors, config specs and loading, LOFT_HOME layout. Imports stdlib, pydantic and yaml only."""
