"""Evaluation problems: GSM8K loading, deterministic synthetic tasks, prompting and grading.

One module per task (or small family), each with its generator and its grader:
arithmetic, coinflip, letters (letters, position), decimals (compare, sort, decimals),
carries, gsm8k; registry ties names to generators and answer formats to graders.
"""

from .gsm8k import load_gsm8k, load_gsm8k_hub
from .problem import HubUnavailable, Problem, TaskError
from .registry import KNOWN_TASKS, TASKS, format_prompt, is_correct, load_task, make_task
from .words import WORDS

__all__ = [
    "Problem",
    "TASKS",
    "KNOWN_TASKS",
    "TaskError",
    "HubUnavailable",
    "WORDS",
    "format_prompt",
    "is_correct",
    "load_gsm8k",
    "load_gsm8k_hub",
    "load_task",
    "make_task",
]
