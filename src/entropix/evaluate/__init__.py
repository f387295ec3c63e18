"""Evaluation harness: tasks, answer grading, statistics and reports (no model needed)."""
