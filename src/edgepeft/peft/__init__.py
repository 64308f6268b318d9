"""PEFT methods on a frozen base, selectable by name through one interface."""

from edgepeft.peft import hf, own  # noqa: F401  (registers the built-in methods)
from edgepeft.peft.base import PeftConfig, PeftMethod, get_method, list_methods, parameter_report, register_method

__all__ = ["PeftConfig", "PeftMethod", "get_method", "list_methods", "parameter_report", "register_method"]
