"""One module per section of the kit; each has TITLE, HOW (what it measures and the formulas) and run(ctx)."""
