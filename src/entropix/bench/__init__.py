"""Speed against a baseline in one run: `entropix bench` (speed.py) and its weight modes against
the peers (modes.py). Figures are ratios measured in one process, never timed unit tests."""
