"""The typer app. Each command parses, calls the package API and prints; it does no work itself."""
