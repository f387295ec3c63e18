"""Pictures: a run's per-token uncertainty (tokens), the evaluation report's charts (report) and
accuracy against compute (compute). matplotlib is imported only when one is drawn."""
