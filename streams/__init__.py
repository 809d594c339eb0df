"""The stream processors: a Faust app computing live call metrics and raising alerts."""
