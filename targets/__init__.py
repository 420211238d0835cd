"""Targets lower a captured (and transformed) program to a deployable format."""

from effc.targets.base import TARGETS, BuildResult, Target, get_target

__all__ = ["TARGETS", "BuildResult", "Target", "get_target"]
