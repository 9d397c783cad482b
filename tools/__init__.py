"""Developer tools run from the repository root (not installed): the headless browser the UI checks use."""
