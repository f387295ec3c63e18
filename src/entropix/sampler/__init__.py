"""Samplers: settings, policies and the catalogue every front end resolves names in."""
